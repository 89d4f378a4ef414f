"""The near-duplicate index at scale: a collection of greyscale pictures is not compared
pairwise.

The index cut the 192-bit hash into bands of adjacent bits. A greyscale picture has no
colour bits, and the colour bits were whole bands: every greyscale picture fell in the
same bucket of those bands, and each new one was compared with every greyscale picture
kept before it. Validate's time grew with the square of the collection (20,000
black-and-white photos: minutes in the near check alone). Bands now take every 7th bit.
"""

import random

import numpy as np
from PIL import Image

from training import config
from training.intake import checks

BITS = config.resolve({}).validate_.near_duplicate_bits  # the default, 6


def _grey_photo(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    grid = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    return Image.fromarray(grid, "L").resize((48, 48), Image.Resampling.BICUBIC).convert("RGB")


def _largest_bucket(index: checks.NearDuplicates) -> int:
    return max(len(entries) for band in index.index for entries in band.values())


def test_greyscale_pictures_do_not_share_one_bucket():
    index = checks.NearDuplicates(BITS)
    for i in range(1500):
        h = checks.dhash(_grey_photo(i))
        assert index.find(h) is None, f"picture {i} taken for a copy"
        index.add(h, str(i))
    # each find compares with the entries of its buckets: one bucket of every greyscale
    # picture made the check quadratic (was 1,500 here: all of them)
    assert _largest_bucket(index) < 20


def test_every_hash_within_the_distance_is_still_found():
    """Pigeonhole over the new bands: a copy up to ``BITS`` bits away is always found,
    and one further away never is (a colour hash and a greyscale one alike)."""
    rng = random.Random(0)
    for trial in range(300):
        h = rng.getrandbits(checks.HASH_BITS)
        if trial % 2:
            h &= ~((1 << 64) - 1)  # no colour bits: a greyscale picture's hash
        index = checks.NearDuplicates(BITS)
        index.add(h, "first")
        flips = rng.sample(range(checks.HASH_BITS), BITS + 1)
        near = h
        for b in flips[:BITS]:
            near ^= 1 << b
        assert index.find(near) == ("first", BITS)
        assert index.find(near ^ (1 << flips[BITS])) is None
