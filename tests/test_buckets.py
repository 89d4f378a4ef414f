"""Aspect-ratio buckets (issue #15): the bucket set, fitting an image to its bucket, the
bucketed batch order, and the loaders on a split of two buckets."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from training import config
from training.engine import loaders
from training.engine import order as orders
from training.engine.images import caption, decode_image
from training.intake import buckets, shards


# ---- the bucket set and fitting ---------------------------------------------------------
@pytest.mark.parametrize(("side", "stride"), [(32, 16), (64, 16), (64, 8), (256, 64)])
def test_buckets_have_about_the_same_area_and_whole_strides(side, stride):
    sizes = config.bucket_sizes(side, stride, 2.0)
    assert sizes[0] == (side, side)
    for w, h in sizes:
        assert w % stride == 0 and h % stride == 0
        assert abs(math.log(w * h / side**2)) <= math.log(config.AREA_TOLERANCE) + 1e-9
        assert max(w, h) / min(w, h) <= 2.0
        assert (h, w) in sizes  # portrait and landscape alike


def test_the_bucket_sets_the_profiles_get():
    assert config.bucket_sizes(32, 16, 2.0) == [(32, 32)]  # tiny: square only
    assert set(config.bucket_sizes(64, 16, 2.0)) == {
        (64, 64), (48, 96), (48, 80), (80, 48), (96, 48),
    }  # fmt: skip
    with pytest.raises(ValueError, match="not a multiple of the bucket stride 16"):
        config.bucket_sizes(40, 16, 2.0)


def test_each_image_goes_to_the_bucket_nearest_its_aspect_ratio():
    sizes = config.bucket_sizes(64, 16, 2.0)
    assert buckets.nearest(200, 100, sizes) == (96, 48)
    assert buckets.nearest(100, 200, sizes) == (48, 96)
    assert buckets.nearest(300, 300, sizes) == (64, 64)
    assert buckets.nearest(170, 100, sizes) == (80, 48)  # 1.7 -> 1.67, not 2.0
    assert buckets.nearest(500, 100, sizes) == (96, 48)  # past the widest: the widest


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_fitting_scales_to_cover_and_crops_the_centre():
    # 200x100: a red left half, a blue right half, a green dot in the middle
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    img.paste((0, 0, 255), (100, 0, 200, 100))
    img.paste((0, 255, 0), (96, 46, 104, 54))
    data, size = buckets.fit_png(_png(img), config.bucket_sizes(64, 16, 2.0))
    out = np.asarray(Image.open(io.BytesIO(data)))
    assert size == (96, 48) and out.shape == (48, 96, 3)
    assert out[24, 5, 0] > 200 and out[24, 90, 2] > 200  # both halves kept, not cropped away
    assert out[24, 47:49, 1].min() > 150  # the centre stays the centre
    # an image already at its bucket's size is passed through byte for byte
    square = _png(Image.new("RGB", (64, 64), (9, 9, 9)))
    assert buckets.fit_png(square, config.bucket_sizes(64, 16, 2.0)) == (square, (64, 64))


# ---- the bucketed order -----------------------------------------------------------------
LENGTHS = [30, 30, 20, 12, 12, 3]  # buckets: 0 0 1 2 2 3 (bucket 3 is smaller than a batch)
GROUPS = [0, 0, 1, 2, 2, 3]


def _bucket_of(o, ids) -> set[int]:
    shard, _ = o.shard_of(np.asarray(ids))
    return {GROUPS[s] for s in shard.tolist()}


def test_bucket_order_draws_every_batch_from_one_bucket_and_each_sample_once_an_epoch():
    o = orders.make(LENGTHS, 8, seed=5, block_shards=1, groups=GROUPS)
    assert isinstance(o, orders.BucketOrder)
    assert o.per_epoch == 60 // 8 + 20 // 8 + 24 // 8 and o.untrained == 3
    for epoch in range(2):
        seen: list[int] = []
        for step in range(epoch * o.per_epoch, (epoch + 1) * o.per_epoch):
            ids = o.step_ids(step)
            assert len(ids) == 8 and len(_bucket_of(o, ids)) == 1
            seen += ids.tolist()
        assert len(seen) == len(set(seen))  # no sample twice in an epoch
        assert 3 not in _bucket_of(o, seen)  # the bucket smaller than a batch never trains
    # an epoch's positions (what the VAE's scaling-factor sample reads): no sample twice
    ids = o.ids(0, 0, o.epoch_len)
    assert o.epoch_len == o.per_epoch * 8 and len(set(ids.tolist())) == len(ids)
    # buckets interleave in a seeded order; the same seed gives the same batches
    first = [next(iter(_bucket_of(o, o.step_ids(s)))) for s in range(o.per_epoch)]
    assert first != sorted(first)
    again = orders.make(LENGTHS, 8, 5, 1, GROUPS)
    assert all(np.array_equal(o.step_ids(s), again.step_ids(s)) for s in range(20))
    other = orders.make(LENGTHS, 8, 6, 1, GROUPS)
    assert any(not np.array_equal(o.step_ids(s), other.step_ids(s)) for s in range(20))
    # a bad sample's stand-ins, and a plain read's, stay in its bucket
    for step in (0, 3, 11):
        bucket = _bucket_of(o, o.step_ids(step))
        stand_ins = [o.stand_in(step, i, k) for i in (0, 7) for k in (1, 9)]
        assert all(_bucket_of(o, [s]) == bucket for s in stand_ins)
    assert o.group_range(65) == (60, 80) and o.group_range(0) == (0, 60)
    # what to prefetch: the step's bucket's blocks
    for _, block in o.blocks_at(4):
        assert {GROUPS[s] for s in block.tolist()} == _bucket_of(o, o.step_ids(4))
    # each bucket reads its batches, so its blocks, in order (was: every (bucket, batch)
    # pair permuted, a bucket's batches jumping between its blocks: a streamed 3-bucket
    # split downloaded 1.5x its shards an epoch)
    for epoch in range(2):
        drawn = [o._batch(epoch * o.per_epoch + j) for j in range(o.per_epoch)]
        for b in {b for _, b, _ in drawn}:
            assert [jb for _, bb, jb in drawn if bb == b] == list(range(o.orders[b].per_epoch))
    with pytest.raises(ValueError, match="contiguous"):
        orders.make([5, 5, 5], 2, 0, 1, [0, 1, 0])


def test_one_bucket_is_the_plain_block_order():
    """A square-only split (every built-in set) keeps exactly the batches it had."""
    o = orders.make([30, 25, 30], 16, 3, 2, groups=[0, 0, 0])
    plain = orders.BlockOrder([30, 25, 30], 16, 3, 2)
    assert all(np.array_equal(o.step_ids(s), plain.step_ids(s)) for s in range(12))


# ---- the loaders on a two-bucket split --------------------------------------------------
SIZES = [(8, 8), (16, 8)]


def bucket_split(directory, n: int = 120) -> None:
    """Every third image 16x8 (its own bucket), the rest 8x8; 13 a shard."""
    rng = np.random.default_rng(0)
    with shards.BucketWriter(directory, "train", 13, "8x8") as w:
        for i in range(n):
            size = SIZES[1] if i % 3 == 0 else SIZES[0]
            px = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            rec = shards.Record(f"{i:06d}", _png(Image.fromarray(px)), "png", f"thing {i}", {})
            w.write(rec, buckets.name(size))


def decode(sample: dict) -> tuple[np.ndarray, str]:
    return decode_image(sample, SIZES), caption(sample)


def collate(samples: list) -> dict[str, np.ndarray]:
    return {
        "x": np.stack([x for x, _ in samples]),
        "n": np.array([int(c.split()[-1]) for _, c in samples]),
    }


@pytest.mark.parametrize("broken", [False, True], ids=["clean", "truncated-shard"])
def test_stream_and_memory_agree_on_a_bucketed_split(tmp_path, broken):
    bucket_split(tmp_path)
    names = sorted(p.name for p in tmp_path.glob("*.tar"))
    assert names[0] == "train-00000.tar" and names[-1].startswith("train-b16x8-")
    if broken:  # a wide-bucket shard loses its tail: its samples get wide stand-ins
        bad = tmp_path / names[-2]
        bad.write_bytes(bad.read_bytes()[:1500])
    mem = loaders.make("memory", str(tmp_path), decode, collate, 8, 0, 2)
    stream = loaders.make("stream", str(tmp_path), decode, collate, 8, 0, 2)
    try:
        assert mem.index.buckets() == ["8x8", "16x8"]
        widths = set()
        for step in [*range(mem.order.per_epoch + 3), 4]:
            want, got = mem.batch(step), stream.batch(step)
            assert torch.equal(got["n"], want["n"]) and torch.equal(got["x"], want["x"])
            wide = got["x"].shape[2] == 16
            assert all((int(k) % 3 == 0) == wide for k in got["n"])  # one bucket a batch
            widths.add(got["x"].shape[2])
        assert widths == {8, 16}
        scanned = list(stream.scan(32))
        assert all(len({int(k) % 3 == 0 for k in b["n"]}) == 1 for b in scanned)
        if not broken:
            assert sorted(torch.cat([b["n"] for b in scanned]).tolist()) == list(range(120))
        assert [len(g) for g in stream.by_bucket(np.array([0, 90, 1, 95]))] == [2, 2]
    finally:
        stream.close()


def test_the_cache_must_hold_two_blocks_per_bucket(tmp_path, monkeypatch):
    """Buckets' batches interleave, each bucket reading its own block and fetching its
    next: a cache sized for two blocks would re-download shards nearly every step, one
    of a block per bucket plus one 1.17x an epoch (found in review)."""
    from training.errors import UserError
    from training.intake.index import ShardEntry, SplitIndex
    from training.intake.store import Store

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    entries = tuple(
        ShardEntry(f"train-{i:05d}.tar", 10, 100, f"{i:064x}", ("8x8", "16x8", "8x16")[i % 3])
        for i in range(9)
    )
    index = SplitIndex("s3://bucket/clean/train", tuple(sorted(entries, key=lambda e: e.bucket)))
    store = Store(tmp_path / "cache", 550)  # 5 shards: two blocks of one, not six
    store.check_fits(index, 1, bucketed=False)
    with pytest.raises(UserError, match="cannot hold 6 blocks of shards"):
        store.check_fits(index, 1)
    Store(tmp_path / "cache2", 600).check_fits(index, 1)


def test_a_bucket_with_no_readable_sample_gives_its_steps_to_the_largest(
    tmp_path, monkeypatch, capsys
):
    """Every shard of the wide bucket is cut short (found in review: one truncated shard
    of a small bucket stopped the run mid-training, "its 1000 stand-ins are all
    unreadable"). Its steps draw a batch of the largest readable bucket instead, the
    same in both loaders, for 2 processes as for one, and after a resume; plain reads
    of it (the VAE's scaling-factor sample) do too; it is said and counted."""
    bucket_split(tmp_path)
    for p in tmp_path.glob("train-b16x8-*.tar"):  # 4 of 11 shards: not a broken split
        p.write_bytes(p.read_bytes()[:1500])
    split = str(tmp_path)
    mem = loaders.make("memory", split, decode, collate, 8, 0, 2)
    stream = loaders.make("stream", split, decode, collate, 8, 0, 2)
    order = stream.order
    steps = [*range(2 * order.per_epoch), 3]  # two epochs, then a jump back (a resume)
    wide = [s for s in steps if order.group_range(int(order.step_ids(s)[0]))[0] > 0]
    assert wide  # the order still schedules the wide bucket's batches
    try:
        want = {s: mem.batch(s) for s in steps}
        for s in steps:
            got = stream.batch(s)
            assert torch.equal(got["n"], want[s]["n"]) and torch.equal(got["x"], want[s]["x"])
            assert got["x"].shape[2] == 8  # one shape a batch: all square now
        for s in wide:  # the square bucket's batch of the same number
            assert torch.equal(want[s]["n"], mem.take(order.step_ids(s, bucket=0))["n"])
        assert stream.stats()["loader_unreadable_buckets"] == 1
        # the scaling-factor sample's plain reads: square stand-ins, not an error
        ids = order.ids(0, 0, order.epoch_len)
        for group in stream.by_bucket(ids):
            assert torch.equal(stream.take(group)["x"], mem.take(group)["x"])
        assert sum(len(b["n"]) for b in stream.scan(32)) == 120
    finally:
        stream.close()
    err = capsys.readouterr().err
    assert "no sample of aspect-ratio bucket 16x8" in err and "from bucket 8x8" in err
    # a resumed run, or another rank, finds the bucket unreadable at the step it reads
    fresh = loaders.make("stream", split, decode, collate, 8, 0, 2)
    assert torch.equal(fresh.batch(wide[-1])["n"], want[wide[-1]]["n"])
    fresh.close()
    monkeypatch.setenv("WORLD_SIZE", "2")
    parts = []
    for r in range(2):
        monkeypatch.setenv("RANK", str(r))
        ranked = loaders.make("stream", split, decode, collate, 8, 0, 2)
        parts.append([ranked.batch(s)["n"] for s in steps])
        ranked.close()
    for k, s in enumerate(steps):
        assert torch.equal(torch.cat([p[k] for p in parts]), want[s]["n"])
