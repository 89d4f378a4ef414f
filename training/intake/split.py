"""The train/val split: by a hash of the sample's URL path, so it is stable when data is
added and the same for any mirror; and the checks that the validation split is large
enough to mean anything.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import urlsplit

from training.intake.canonical import unsigned_url


def split_key(url: str, key: str) -> str:
    """What the train/val split hashes: the URL's path and query, without scheme and
    host, so a mirror, or the random loopback port the built-in sets are served from,
    does not reshuffle the split between runs; the sample key when there is no URL.
    The query loses a presigned URL's signature (``canonical.unsigned_url``), which
    changes every time the URL is signed; any other URL hashes as it always did, so
    no sample already split changes side."""
    if not url:
        return key
    parts = urlsplit(unsigned_url(url))
    return parts.path + (f"?{parts.query}" if parts.query else "")


# In data/raw/shards/ (written by ingest's sync, swapped in with the shards): row id ->
# the URL a renamed picture keeps splitting by, its first name's (``sync.carry``).
# Absent when no picture was renamed, so data/raw is as it always was.
CARRIED = "carried_splits.json"


def carried_splits(shard_dir: Path) -> dict[str, str]:
    """The URLs renamed pictures split by (``CARRIED``), {} when there are none."""
    f = shard_dir / CARRIED
    return json.loads(f.read_text()) if f.is_file() else {}


def split_hash(url_or_key: str) -> int:
    """A sample's place in [0, 2**32): it goes to val when below ``fraction * 2**32``."""
    return int(hashlib.sha1(url_or_key.encode()).hexdigest()[:8], 16)


def in_val(url_or_key: str, fraction: float) -> bool:
    return split_hash(url_or_key) < fraction * 0x100000000


# What the evaluation needs of the val split: one image at all (reconstruction PSNR, and
# for user data the prompts are the val captions), and for the distribution metrics
# (fd_clip, cmmd_clip) two halves of at least two images each
# (evaluation.metrics.distribution.MIN_SAMPLES; tests/test_eval_small_val.py keeps the two in step).
MIN_VAL = 1
MIN_VAL_FOR_DISTRIBUTION = 4


class SplitError(ValueError):
    """The clean data cannot be split into usable train and val sets (user-fixable:
    more images or another ``validate.val_fraction``)."""


def fraction_for(lowest: list[int], want: int, n_clean: int) -> float | None:
    """The smallest ``val_fraction`` (four decimals: coarser rounding could sweep further
    samples into val, even all of them) that puts ``want`` of the clean samples in val,
    from the ``want`` lowest split hashes, leaving one for train; None when there are
    too few samples for that."""
    import math

    if want >= n_clean or len(lowest) < want:
        return None
    f = math.ceil((sorted(lowest)[want - 1] + 1) / 0x100000000 * 10000) / 10000
    return f if f < 1.0 else None


def split_problem(
    n_clean: int,
    n_train: int,
    n_val: int,
    fraction: float,
    lowest: list[int],
    rejects: str = "rejects.parquet",
) -> tuple[str | None, str | None]:
    """(error, warning) about the split's sizes, each one line in words with what to
    change: an error when training or evaluation cannot run at all, a warning when
    the evaluation will have to skip its distribution metrics. ``rejects`` is where
    the rejects table will be once the stage has failed (its outputs are removed)."""
    more = "add images"
    if n_clean == 0:
        return f"no image passed the quality gate; see {rejects} for why", None
    if n_train == 0:
        return (
            f"0 of {n_clean} clean images went to train (validate.val_fraction is "
            f"{fraction}); lower validate.val_fraction or {more}"
        ), None
    if n_val < MIN_VAL:
        f = fraction_for(lowest, MIN_VAL_FOR_DISTRIBUTION, n_clean) or fraction_for(
            lowest, MIN_VAL, n_clean
        )
        how = f"raise validate.val_fraction to {f} or {more}" if f else more
        return (
            f"{n_val} of {n_clean} clean images went to val (validate.val_fraction is "
            f"{fraction}); evaluation needs at least {MIN_VAL}: {how}"
        ), None
    if n_val < MIN_VAL_FOR_DISTRIBUTION:
        f = fraction_for(lowest, MIN_VAL_FOR_DISTRIBUTION, n_clean)
        how = f"raise validate.val_fraction to {f} or {more}" if f else more
        return None, (
            f"only {n_val} of {n_clean} clean images went to val (validate.val_fraction is "
            f"{fraction}); evaluate will skip fd_clip and cmmd_clip, which need "
            f"{MIN_VAL_FOR_DISTRIBUTION}: {how}"
        )
    return None, None
