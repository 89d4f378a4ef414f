"""The training loaders (issue #14, "Data engine"): batch order, equivalence of the
streaming and in-memory paths, data parallelism, and bad data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.engine import loaders
from training.engine.order import BlockOrder
from training.intake.store import MissingShard

from .loaderkit import collate, decode, image_split


def test_block_order_is_a_seeded_permutation_with_block_locality():
    lengths = [30, 25, 30, 10, 30, 40, 35]  # 200 samples in 7 shards
    o = BlockOrder(lengths, batch_size=16, seed=3, block_shards=2)
    for epoch in range(2):
        ids = o.ids(epoch, 0, o.n)
        assert sorted(ids.tolist()) == list(range(o.n))  # each sample once per epoch
        # locality: consecutive runs of the epoch come from two shards at a time
        shard, _ = o.shard_of(ids)
        blocks, ends = o._layout(epoch)
        lo = 0
        for block, end in zip(blocks, ends, strict=True):
            assert set(shard[lo:end].tolist()) == set(block.tolist())
            lo = end
    assert not np.array_equal(o.ids(0, 0, o.n), o.ids(1, 0, o.n))  # reshuffled per epoch
    again = BlockOrder(lengths, 16, 3, 2)
    assert all(np.array_equal(o.step_ids(s), again.step_ids(s)) for s in (0, 5, 12, 13, 40))
    other = BlockOrder(lengths, 16, 4, 2)
    assert not np.array_equal(o.step_ids(0), other.step_ids(0))
    assert o.per_epoch == 200 // 16 and all(len(o.step_ids(s)) == 16 for s in range(30))
    # a split within one block is one full permutation: shards mix in every batch
    full = BlockOrder(lengths, 16, 3, 16)
    assert len(set(full.shard_of(full.step_ids(0))[0].tolist())) > 2


def _truncate(directory, name: str = "train-00002.tar") -> None:
    bad = directory / name
    bad.write_bytes(bad.read_bytes()[:3000])


@pytest.mark.parametrize("broken", [False, True], ids=["clean", "truncated-shard"])
def test_stream_and_memory_give_the_same_batches(tmp_path, monkeypatch, broken):
    """The two loaders are interchangeable: the same samples, in the same order,
    decoded to the same bytes, for any number of decode threads; with a broken shard
    too (the same stand-ins replace its samples)."""
    directory = image_split(tmp_path / "train")
    if broken:
        _truncate(directory)
    split = str(directory)
    mem = loaders.make("memory", split, decode, collate, 16, 0, 2)
    monkeypatch.setenv("KILN_LOADER_THREADS", "1")
    one = loaders.make("stream", split, decode, collate, 16, 0, 2)
    monkeypatch.setenv("KILN_LOADER_THREADS", "4")
    four = loaders.make("stream", split, decode, collate, 16, 0, 2)
    try:
        for step in [*range(14), 30, 7]:  # two epochs, then a jump back (a resume)
            want = mem.batch(step)
            for got in (one.batch(step), four.batch(step)):
                assert torch.equal(got["n"], want["n"]) and torch.equal(got["x"], want["x"])
        if not broken:
            assert torch.equal(mem.batch(3)["n"], torch.from_numpy(mem.order.step_ids(3)))
        # reading by id after training (e.g. the VAE's scaling-factor sample), and in order
        ids = mem.order.ids(0, 0, 40)
        assert torch.equal(mem.take(ids)["x"], one.take(ids)["x"])
        in_order = torch.cat([b["n"] for b in mem.scan(64)])
        assert torch.equal(in_order, torch.cat([b["n"] for b in one.scan(64)]))
        if not broken:
            assert torch.equal(in_order, torch.arange(200))
    finally:
        one.close(), four.close()


@pytest.mark.parametrize("broken", [False, True], ids=["clean", "truncated-shard"])
def test_processes_split_the_same_global_batch(tmp_path, monkeypatch, broken):
    """Under data parallelism each rank reads only its slice; the slices of 2 (or 4)
    ranks put together are the 1-process global batch, for every step, and with a
    broken shard too: a bad sample's stand-in does not depend on who reads it."""
    directory = image_split(tmp_path / "train")
    if broken:
        _truncate(directory)
    split = str(directory)
    whole = loaders.make("stream", split, decode, collate, 16, 0, 2)
    want = [whole.batch(s)["n"] for s in range(13)]
    whole.close()
    for world in (2, 4):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        parts = []
        for r in range(world):
            monkeypatch.setenv("RANK", str(r))
            ranked = loaders.make("stream", split, decode, collate, 16, 0, 2)
            parts.append([ranked.batch(s)["n"] for s in range(13)])
            ranked.close()
            assert all(len(b) == 16 // world for b in parts[-1])
        for s in range(13):
            assert torch.equal(torch.cat([p[s] for p in parts]), want[s])


def test_a_batch_cut_to_a_small_split_that_processes_cannot_share_is_refused(tmp_path, monkeypatch):
    """batch_size 8 on a 5-sample split: batches of 5, which 2 processes cannot share.
    Was: the preflight passed (8 splits over 2) and the stage died at its first step
    with "global batch 5 does not split evenly"; now a UserError says why, at the first
    batch (a split made for scans only, a val split of one picture, is fine: it is read
    whole by every process)."""
    from training.errors import UserError

    split = str(image_split(tmp_path / "train", n=5, per_shard=5))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    loader = loaders.make("stream", split, decode, collate, 8, 0, 2)
    assert len(list(loader.scan(8))) == 1  # scans read the split whole
    with pytest.raises(UserError, match="cut to the 5 samples it holds, which do not split over 2"):
        loader.batch(0)
    loader.close()
    fine = loaders.make("stream", split, decode, collate, 4, 0, 2)  # 4 of 5
    assert len(fine.batch(0)["n"]) == 2
    fine.close()


def test_truncated_shard_is_skipped_counted_and_said(tmp_path, capsys):
    """A shard cut short (a partial copy, a dying disk) does not stop training: it is
    skipped with its reason, counted, and every batch keeps its size."""
    directory = image_split(tmp_path / "train")
    _truncate(directory)
    loader = loaders.make("stream", str(directory), decode, collate, 16, 0, 16)
    try:
        seen = torch.cat([loader.batch(s)["n"] for s in range(12)])
        assert len(seen) == 12 * 16
        assert not set(range(74, 111)) & set(seen.tolist())  # shard 2 holds 74..110
        stats = loader.stats()
        assert stats["loader_skipped_shards"] == 1
    finally:
        loader.close()
    err = capsys.readouterr().err
    assert "skipping shard train-00002.tar" in err and "not a readable tar" in err


def test_undecodable_sample_is_skipped_and_counted(tmp_path, capsys):
    from training.intake import shards

    with shards.ShardWriter(tmp_path, "train", 10) as w:
        from .loaderkit import png

        rng = np.random.default_rng(0)
        for i in range(20):
            data = b"\x89PNG not really" if i == 5 else png(rng)
            w.write(shards.Record(f"{i:06d}", data, "png", f"caption {i}", {}))
    loader = loaders.make("stream", str(tmp_path), decode, collate, 20, 0, 16)
    try:
        n = loader.batch(0)["n"]
        assert len(n) == 20 and 5 not in n.tolist()
        assert loader.stats()["loader_skipped_samples"] == 1
    finally:
        loader.close()
    assert "skipping sample 5 of train-00000.tar" in capsys.readouterr().err


def test_mostly_unreadable_split_stops_with_a_clear_error(tmp_path):
    from training.errors import UserError

    directory = image_split(tmp_path / "train", n=60, per_shard=20)
    for name in ("train-00000.tar", "train-00001.tar"):
        (directory / name).write_bytes(b"\0" * 100)
    loader = loaders.make("stream", str(directory), decode, collate, 30, 0, 16)
    with pytest.raises(UserError, match="2 of 3 shards are unreadable"):
        for s in range(4):
            loader.batch(s)
    loader.close()


def test_missing_shard_fails_before_training_naming_it(tmp_path):
    directory = image_split(tmp_path / "train")
    (directory / "train-00003.tar").unlink()
    with pytest.raises(MissingShard, match="train-00003.tar"):
        loaders.make("stream", str(directory), decode, collate, 16, 0, 16)


def test_pickled_member_is_refused_not_loaded(tmp_path):
    from training.intake import shards

    with shards.tar_writer(tmp_path / "train-00000.tar") as w:
        for i in range(4):
            w.write({"__key__": f"{i:06d}", "png": b"x", "pyd": b"cos\nsystem\n"})
    from training.intake.index import write_index

    write_index(tmp_path, {"train-00000.tar": 4}, "train")
    loader = loaders.make("stream", str(tmp_path), decode, collate, 4, 0, 16)
    from training.errors import UserError

    with pytest.raises(UserError, match="none of its samples can be read"):
        loader.batch(0)
    loader.close()


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA"])
def test_decoder_gives_pillows_pixels_for_each_png_kind(mode):
    """The loaders decode with OpenCV (fast, GIL-free); the pixels must be Pillow's, the
    reference every other path (validate, the metrics, the report) uses."""
    import io

    from PIL import Image

    from training.engine.images import decode_image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    img = rgb.quantize(16) if mode == "P" else rgb.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    got = decode_image({"__key__": "k", "png": buf.getvalue()}, [(8, 6)])
    want = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    with pytest.raises(ValueError, match="image is 8x6, expected 6x6"):
        decode_image({"__key__": "k", "png": buf.getvalue()}, 6)
    with pytest.raises(ValueError, match="no image member"):
        decode_image({"__key__": "k", "txt": b"a caption"}, 6)


def _bad_data_split(directory):
    """200 samples, 37 a shard: shard 2 cut short, three samples that do not decode."""
    from training.intake import shards

    from .loaderkit import png

    rng = np.random.default_rng(0)
    with shards.ShardWriter(directory, "train", 37) as w:
        for i in range(200):
            data = b"\x89PNG not really" if i in (5, 40, 150) else png(rng)
            w.write(shards.Record(f"{i:06d}", data, "png", f"thing {i}", {}))
    _truncate(directory)
    return directory


def _stats_on_rank(rank: int, world: int, directory: str, init: str, out: str) -> None:
    """One torchrun-like process: its loader reads 13 steps, then the stage's stats."""
    import json
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), KILN_DEVICE="cpu")
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        loader = loaders.make("stream", directory, decode, collate, 16, 0, 2)
        for s in range(13):
            loader.batch(s)
        stats = loader.stats()
        loader.close()
    finally:
        torch.distributed.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(stats, f)


def test_skip_counts_are_the_same_for_any_number_of_processes(tmp_path, monkeypatch):
    """Found in review: every rank reads the same blocks and finds the same bad shard,
    and the counts were summed, so 1, 2 and 4 processes reported 1, 2 and 4 shards."""
    import json

    import torch.multiprocessing as mp

    directory = str(_bad_data_split(tmp_path / "train"))
    one = loaders.make("stream", directory, decode, collate, 16, 0, 2)
    for s in range(13):
        one.batch(s)
    want = one.stats()
    one.close()
    assert want["loader_skipped_shards"] == 1 and want["loader_skipped_samples"] >= 2
    for world in (2, 4):
        out = tmp_path / f"stats{world}"
        init = f"file://{tmp_path / f'init{world}'}"
        mp.spawn(_stats_on_rank, args=(world, directory, init, str(out)), nprocs=world)
        for r in range(world):
            got = json.loads((tmp_path / f"stats{world}.{r}").read_text())
            for key in ("loader_skipped_shards", "loader_skipped_samples"):
                assert got[key] == want[key], (world, r, key)


def _flaky(monkeypatch, fails: int, where: str, name: str = "train-00001.tar") -> list:
    """Make the first ``fails`` opens (``where="open"``) or member reads (``"read"``) of
    shard ``name`` fail with EIO, as a dying NFS mount or a busy disk does."""
    import errno
    import tarfile

    from training.engine.loaders import readers

    failed: list[str] = []

    def eio(what: str) -> None:
        if len(failed) < fails:
            failed.append(what)
            raise OSError(errno.EIO, "Input/output error")

    if where == "open":
        real_open = tarfile.open

        def open_(path, *a, **k):
            if str(path).endswith(name):
                eio(str(path))
            return real_open(path, *a, **k)

        monkeypatch.setattr(tarfile, "open", open_)
    else:
        real_read = readers._File.read

        def read(self, start, n, what):
            if self.name == name:
                eio(what)
            return real_read(self, start, n, what)

        monkeypatch.setattr(readers._File, "read", read)
    monkeypatch.setattr(readers, "RETRY_DELAYS", (0, 0, 0), raising=False)
    return failed


@pytest.mark.parametrize("where", ["open", "read"])
def test_a_passing_io_error_is_tried_again_not_taken_for_bad_data(tmp_path, monkeypatch, where):
    """Found in review: any OSError opening a tar (EIO, ESTALE, EMFILE) marked the shard
    corrupt for the rest of the run, and one reading a member marked the sample bad:
    a moment's storage trouble silently replaced good data with stand-ins."""
    directory = str(image_split(tmp_path / "train"))
    clean = loaders.make("stream", directory, decode, collate, 16, 0, 16)
    want = [clean.batch(s)["n"] for s in range(4)]
    clean.close()
    failed = _flaky(monkeypatch, 2, where)
    loader = loaders.make("stream", directory, decode, collate, 16, 0, 16)
    try:
        assert all(torch.equal(loader.batch(s)["n"], want[s]) for s in range(4))
        stats = loader.stats()
    finally:
        loader.close()
    assert len(failed) == 2  # it did fail, twice, and was read on the third try
    assert stats["loader_skipped_shards"] == 0 and stats["loader_skipped_samples"] == 0


@pytest.mark.parametrize("where", ["open", "read"])
def test_storage_that_keeps_failing_stops_the_stage_naming_the_shard(tmp_path, monkeypatch, where):
    directory = str(image_split(tmp_path / "train"))
    failed = _flaky(monkeypatch, 10**6, where)
    loader = loaders.make("stream", directory, decode, collate, 16, 0, 16)
    try:  # an OSError: the stage prints it as one line (and the flow decides on a retry)
        with pytest.raises(OSError, match="train-00001.tar: Input/output error on 4 tries"):
            loader.batch(0)
        assert not loader.bad_shards and not loader.skipped_samples  # nothing skipped
    finally:
        loader.close()
    assert len(failed) == 4


def test_samples_per_s_counts_the_batch_the_loader_served(tmp_path, capsys):
    """Found in review: the loop counted batch_size samples a step, but a loader cuts its
    batch to the split's size (or its largest bucket's), silently: samples/s was
    overstated. It counts the served batch now, and the cut is said."""
    from training import engine as E

    directory = image_split(tmp_path / "train", n=40, per_shard=20)
    loader = loaders.make("stream", str(directory), decode, collate, 64, 0, 16)
    assert loader.global_batch == 40
    model = torch.nn.Linear(3, 1)
    cfg = E.LoopCfg(
        steps=3, lr=1e-3, warmup_steps=0, grad_clip=1.0, batch_size=64,
        checkpoint_every=100, log_every=1,
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    trainer = E.Trainer("toy", model, opt, cfg, E.Checkpointer(tmp_path / "ck", "fp"))

    def step_fn(step):
        x = loader.batch(step)["x"].float().mean((1, 2))  # [40, 3]
        return model(x).pow(2).mean(), {}

    try:
        out = trainer.fit(step_fn)
    finally:
        loader.close()
    assert out["samples_per_s"] * out["train_seconds"] == pytest.approx(3 * 40)
    assert "batch_size 64 is more than" in capsys.readouterr().err


def test_latents_refuse_a_clean_shard_cut_short_before_encoding_anything(tmp_path):
    """The training loaders skip and count a damaged shard; precompute_latents read the
    clean split with webdataset, which yields the samples before the cut and stops
    without a word (was: latents of 7 of a shard's 10 samples, the manifest naming the
    whole split). It now checks every shard against the index first."""
    from training.errors import UserError
    from training.intake import shards
    from training.phases.latents import check_clean

    directory = image_split(tmp_path / "train")
    check_clean(directory)  # whole: no error
    path = sorted(directory.glob("*.tar"))[2]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert 0 < sum(1 for r in shards.read([path])) < 37  # what webdataset gives: no error
    with pytest.raises(UserError, match=r"train-00002.tar is not the shard .*index.json names"):
        check_clean(directory)


def test_the_unets_val_shards_are_checked_before_training(tmp_path):
    """A val latent shard missing from the store stopped train_unet at its first preview,
    600 steps in (train's were checked at the start, as the VAE's and CLIP's val)."""
    from training import config
    from training.phases import unet

    from .loaderkit import latents_dir

    root = latents_dir(tmp_path / "latents", n=64, per_shard=32, n_val=64)
    (root / "val" / "val-00001-000.safetensors").unlink()
    params = config.resolve({"profile": "tiny"})
    with pytest.raises(MissingShard, match="val-00001-000.safetensors"):
        unet.run(params, root, tmp_path / "no-vae", tmp_path / "out", tmp_path / "ckpt")
    assert not (tmp_path / "out").exists()


def test_the_in_memory_loader_holds_few_shards_open_while_it_loads(tmp_path):
    """It opened every shard and closed them at the end: 100 shards under a limit of 96
    file handles failed with "Too many open files", reported as failing storage (a
    common default limit of 1,024 meant about 1,000 shards)."""
    import subprocess
    import sys

    image_split(tmp_path / "train", n=200, per_shard=2)  # 100 shards
    script = (
        "import resource, sys; sys.path.insert(0, 'tests')\n"
        "from loaderkit import decode, collate\n"
        "from training.engine.loaders import InMemory\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))\n"
        f"m = InMemory({str(tmp_path / 'train')!r}, decode, collate, 32, 0, 4)\n"
        "print('loaded', int(m.valid.sum()))\n"
    )
    cmd = [sys.executable, "-c", script]
    ran = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "loaded 200" in ran.stdout
