"""The "first N" readers (validation PSNR and recall, the held-out loss, FD's real
images, reconstruction, the copy search) read N samples spread over the split, each
aspect-ratio bucket in proportion. Found in review: the canonical order is bucket by
bucket, the square one first, so the first N of a bucketed split were all square."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import torch
from PIL import Image

from training.engine import loaders
from training.engine.images import caption, decode_image
from training.intake import buckets, shards

SIZES = [(8, 8), (16, 8), (8, 16)]
KIND = {(8, 8): "square", (16, 8): "wide", (8, 16): "tall"}


def val_split(directory, n: int = 300) -> None:
    """40% square, 30% wide, 30% tall, interleaved as a collection arrives; 25 a shard."""
    rng = np.random.default_rng(0)
    with shards.BucketWriter(directory, "val", 25, "8x8") as w:
        for i in range(n):
            size = SIZES[0] if i % 10 < 4 else SIZES[1] if i % 10 < 7 else SIZES[2]
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
                buf, format="PNG"
            )
            rec = shards.Record(f"{i:06d}", buf.getvalue(), "png", f"{KIND[size]} {i}", {})
            w.write(rec, buckets.name(size))


def _split(directory) -> loaders.Split:
    return loaders.Split(
        str(directory),
        lambda s: (decode_image(s, SIZES).shape, caption(s)),
        lambda xs: {"shape": [s for s, _ in xs], "caption": [c for _, c in xs]},
    )


def test_a_limited_scan_takes_every_bucket_in_proportion_and_the_same_each_time(tmp_path):
    val_split(tmp_path)
    split = _split(tmp_path)
    try:
        batches = list(split.scan(16, 60))
        assert all(len(set(b["shape"])) == 1 for b in batches)  # one shape a batch
        kinds = Counter(c.split()[0] for b in batches for c in b["caption"])
        assert kinds == {"square": 24, "wide": 18, "tall": 18}  # 40/30/30 of 60
        again = [c for b in split.scan(16, 60) for c in b["caption"]]
        assert again == [c for b in batches for c in b["caption"]]  # deterministic
        # spread over the shards too, not the first of each bucket
        shard, _ = split.order.shard_of(split.picked(60))
        assert set(shard.tolist()) == set(range(len(split.index.shards)))
        # all of it (or more than all): every sample, in canonical order, as before
        ids = np.concatenate(list(split.ranges(16)))
        assert np.array_equal(ids, np.arange(300))
        assert np.array_equal(np.concatenate(list(split.ranges(16, 10**6))), ids)
        assert list(split.ranges(16, 0)) == []  # val_samples: 0 reads nothing, as before
    finally:
        split.close()
    # the records the metrics read (FD's real images, reconstruction, the copy search's
    # val) are the same pick
    recs = loaders.records(str(tmp_path), 60)
    assert Counter(KIND[r.image().size] for r in recs) == kinds
    assert [r.caption for r in recs] == again


def test_fd_compares_real_images_of_every_bucket(tmp_path, monkeypatch):
    from training import config
    from training.evaluation.metrics import distribution
    from training.evaluation.metrics.base import Samples

    val_split(tmp_path / "clean" / "val")
    seen: list[str] = []

    def paired(prompts, real_captions):
        seen.extend(real_captions)
        return [], "spread"  # too few: scored as skipped, nothing embedded

    monkeypatch.setattr(distribution, "paired", paired)
    params = config.resolve({"ingest": {"dataset": "folder", "source": "x", "image_size": 32}})
    s = Samples(params, [], [], [], None, tmp_path / "clean", tmp_path, tmp_path)
    distribution.score(s, limit=100)
    # the compared half: every other picture of a spread over the three buckets
    assert Counter(c.split()[0] for c in seen) == {"square": 20, "wide": 15, "tall": 15}


def test_the_copy_search_shows_the_training_image_it_found_past_the_first_n(tmp_path):
    """A copy search over fewer than all training images reads a spread of them; the
    flagged pair must show the image found, not the one at that position of a prefix."""
    from tests.loaderkit import SIZE, image_split
    from tests.test_memorisation import BlurVAE
    from training.engine.images import to_tensor, to_uint8
    from training.evaluation.metrics.memorisation import copy_scores

    image_split(tmp_path / "train", n=120, size=SIZE)
    vae = BlurVAE()
    train = loaders.Split(
        str(tmp_path / "train"), lambda s: decode_image(s, SIZE), lambda px: {"px": np.stack(px)}
    )
    try:
        assert 115 in train.picked(12).tolist()  # (2k+1) * 120 // 24: 5, 15, ..., 115
        seen = train.take(np.array([115]))["px"].numpy()
        with torch.no_grad():
            rendered = vae(to_tensor(seen), sample_posterior=False).sample.clamp(-1, 1)
        samples = [Image.fromarray(u8) for u8 in to_uint8(rendered)]
        out = copy_scores(samples, [], train, vae, SIZE, threshold=0.02, limit=12)
    finally:
        train.close()
    assert out["copies"] == 1 and out["copy_search_samples"] == 12
    (_, shown, _), *_ = out["memorisation_pairs"]
    assert (shown == seen[0]).all()
    assert "spread over the split" in out["copy_search_note"]


def test_a_prompt_cap_keeps_the_captions_fd_compares_from_every_bucket(tmp_path):
    """evaluate.max_prompts keeps first the captions of the real half FD and CMMD
    compare with. Were: taken from the first 512 in shard order (the square bucket's),
    while FD reads a pick spread over the buckets, so past 512 val samples a cap kept
    captions FD never compares and it fell back to unpaired samples."""
    from training import config
    from training.evaluation.metrics import distribution
    from training.evaluation.prompts import prompt_set

    val_split(tmp_path / "val", n=2000)
    cap = 300  # above the 256 captions FD compares, below the 2,000 val captions
    params = config.resolve(
        {"ingest": {"dataset": "folder", "source": "x"}, "evaluate": {"max_prompts": cap}}
    )
    kept = {p.prompt for p in prompt_set(params, tmp_path)}
    compared = [r.caption for r in loaders.records(str(tmp_path / "val"), distribution.LIMIT)]
    assert set(compared[1::2]) <= kept
    assert set(Counter(c.split()[0] for c in compared[1::2])) == {"square", "wide", "tall"}
