"""precompute_latents reuses an old latent file's rows only when the file is the one its
split's ``index.json`` names (size and sha256), as the clean shards are checked. The
old rows are copied as they are, never decoded: an old file with one flipped bit was
copied into the new latents without a word, and one cut short stopped the stage with
safetensors' "incomplete metadata", which names no file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from training.config import resolve
from training.phases.latent_cache import read_rows_meta

from .loaderkit import image_split


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, object]:
    """A clean split (24 train pictures in 3 shards, 8 val) and a VAE and CLIP trained
    one step on it: enough for real latents, in seconds."""
    from training.phases import clip, vae

    root = tmp_path_factory.mktemp("made")
    image_split(root / "clean" / "train", n=24, per_shard=8, size=32)
    image_split(root / "clean" / "val", n=8, per_shard=8, size=32, seed=1, prefix="val")
    one = {"steps": 1, "batch_size": 8, "checkpoint_every": 1, "log_every": 1}
    params = resolve({"ingest": {"image_size": 32}, "train_vae": one, "train_clip": one})
    vae.run(params, root / "clean", root / "vae", root / "ck-vae")
    clip.run(params, root / "clean", root / "clip", root / "ck-clip")
    return root, params


def _means(latents: Path) -> dict[str, torch.Tensor]:
    """content key -> posterior mean, every train row."""
    out = {}
    for f in sorted((latents / "train").glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            keys = read_rows_meta(fh.metadata())["content"]
            mean = fh.get_tensor("mean").clone()  # not a view of the file
        out.update({k: mean[i] for i, k in enumerate(keys)})
    return out


def _flip_a_bit(f: Path) -> str:
    """Flip one bit of the first row's posterior mean in ``f``; returns its content key
    (the safetensors header is left whole: the file opens as before)."""
    b = bytearray(f.read_bytes())
    n = struct.unpack("<Q", bytes(b[:8]))[0]
    header = json.loads(bytes(b[8 : 8 + n]))
    b[8 + n + header["mean"]["data_offsets"][0] + 1] ^= 0x40  # row 0, first float
    f.write_bytes(bytes(b))
    return read_rows_meta(header["__metadata__"])["content"][0]


@pytest.mark.parametrize("damage", ["flipped bit", "cut short"])
def test_an_old_latent_file_that_is_not_as_its_index_says_is_encoded_again(
    made, tmp_path, capsys, damage
):
    from training.phases import latents

    root, params = made
    out = tmp_path / "latents"

    def run() -> dict:
        return latents.run(params, root / "clean", root / "vae", root / "clip", out)

    assert run()["latents_encoded"] == 32
    good = _means(out)
    old = out / "train" / "train-00001-000.safetensors"
    if damage == "flipped bit":
        key = _flip_a_bit(old)
        assert not torch.equal(_means(out)[key], good[key])  # it still opens, one row off
    else:
        old.write_bytes(old.read_bytes()[:-100])
    capsys.readouterr()

    m = run()
    said = capsys.readouterr().err
    # that file's 8 rows are encoded again (the same models: the same values), the other
    # 24 reused; the stage names the file and counts it
    assert (m["latents_encoded"], m["latents_reused"]) == (8, 24)
    assert m["latents_cache_files_rejected"] == 1
    assert f"not reusing {old}: " in said and "its rows are encoded again" in said
    assert "1 old latent files left out" in said
    again = _means(out)
    assert again.keys() == good.keys()
    for k, mean in good.items():
        assert torch.allclose(again[k], mean, atol=1e-5), k
    latents.check_clean(out / "train")  # the new output is whole


def test_old_latents_without_an_index_are_not_reused(tmp_path):
    """A file no index names (a split without its index, or a file beside the ones it
    names) is not known to be whole: left out, and said."""
    from safetensors.torch import save_file

    from training.intake.index import write_index
    from training.phases.latent_cache import LatentCache

    old = tmp_path / "latents"
    for split in ("train", "val"):
        (old / split).mkdir(parents=True)
        save_file({"mean": torch.zeros(2, 4)}, old / split / f"{split}-0.safetensors",
                  metadata={"content": f"{split}1,{split}2"})  # fmt: skip
    write_index(old / "train", {"train-0.safetensors": 2}, "train")
    save_file({"mean": torch.zeros(1, 4)}, old / "train" / "stray.safetensors",
              metadata={"content": "s1"})  # fmt: skip
    manifest = {"vae": {"fingerprint": "v"}, "clip": {"fingerprint": "c"}, "code": "x",
                "tensors": {"text": {"dtype": "torch.float16"}}}  # fmt: skip
    (old / "manifest.json").write_text(json.dumps(manifest))
    cache = LatentCache(old, "v", "c", "float16", code_fp="x")
    assert set(cache.where) == {"train1", "train2"}
    assert {p.name: why for p, why in cache.rejected.items()} == {
        "stray.safetensors": "not named in train/index.json",
        "val-0.safetensors": "no readable index.json in val/",
    }
    assert cache.reason.startswith("2 rows encoded by the same models; 2 old latent files")


WRITE = """
import sys
from pathlib import Path
import torch
from training.phases.latents import _ShardWriter
w = _ShardWriter(Path(sys.argv[1]), "train", 0, 8)
g = torch.Generator().manual_seed(0)
mean = torch.randn(4, 4, 2, 2, generator=g)
w.add([f"k{i}" for i in range(4)], [f"c{i}" for i in range(4)], mean=mean)
w.flush()
"""


def test_the_same_rows_are_the_same_bytes_in_every_process(tmp_path: Path):
    """safetensors writes its metadata map in each process's hash order: with two
    entries the same rows were a file of other bytes in about half the runs, so an
    unchanged precompute_latents changed its DVC hash and DVC retrained the U-Net on the
    same data. One entry now; eight processes write one file, byte for byte."""
    import subprocess
    import sys

    from safetensors import safe_open

    made = []
    for run in range(8):
        out = tmp_path / str(run)
        (out / "train").mkdir(parents=True)
        proc = subprocess.run(
            [sys.executable, "-c", WRITE, str(out)], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        made.append((out / "train" / "train-00000-000.safetensors").read_bytes())
    assert all(b == made[0] for b in made[1:])
    with safe_open(tmp_path / "0" / "train" / "train-00000-000.safetensors", "pt") as fh:
        rows = read_rows_meta(fh.metadata())
    assert rows == {"keys": ["k0", "k1", "k2", "k3"], "content": ["c0", "c1", "c2", "c3"]}


KILLED = """
import sys
from pathlib import Path
from training.config import resolve
from training.phases import latents
root, clean, out = map(Path, sys.argv[1:])
params = resolve({"ingest": {"image_size": 32},
                  "precompute_latents": {"samples_per_shard": 10, "batch_size": 10}})
latents.run(params, clean, root / "vae", root / "clip", out)
"""


def test_a_killed_run_resumes_with_the_rows_it_finished(made, tmp_path: Path):
    """The bug: a run killed partway left its finished files in the staging folder, and
    the next run cleared it first: every row was encoded again (hours of GPU at 10 M
    rows). Now they are reused, and the output is the uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from training.phases import latents

    root, _ = made
    clean = tmp_path / "clean"  # 240 rows, 10 a file: a run to be killed partway
    image_split(clean / "train", n=240, per_shard=60, size=32)
    image_split(clean / "val", n=8, per_shard=8, size=32, seed=1, prefix="val")
    out, staging = tmp_path / "latents", tmp_path / ".latents.new"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(root), str(clean), str(out)],
        env=env,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while len(list(staging.glob("train/*.safetensors"))) < 4:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(staging.glob("train/*.safetensors")))
    assert 4 <= done < 24, done

    one = {"samples_per_shard": 10, "batch_size": 10}
    params = resolve({"ingest": {"image_size": 32}, "precompute_latents": one})
    m = latents.run(params, clean, root / "vae", root / "clip", out)
    assert m["latents_reused"] >= done, m
    assert m["latents_encoded"] + m["latents_reused"] == 248
    assert not (tmp_path / ".latents.partial").exists()  # done with: removed

    full = tmp_path / "full" / "latents"
    assert latents.run(params, clean, root / "vae", root / "clip", full)["latents_reused"] == 0
    made_files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert made_files == sorted(p.relative_to(full) for p in full.rglob("*") if p.is_file())
    for f in made_files:  # the same rows in the same files (up to a thread count's rounding)
        if f.suffix == ".safetensors":
            a, b = load_file(out / f), load_file(full / f)
            assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in b), f


def test_a_run_killed_between_the_swaps_renames_keeps_its_cache(made, tmp_path):
    """Was: a kill between replace_dir's two renames left the old output at
    data/.latents.old, which the next run deleted unread and encoded every row again."""
    from training.phases import latents

    root, params = made
    out = tmp_path / "latents"
    assert (
        latents.run(params, root / "clean", root / "vae", root / "clip", out)["latents_encoded"]
        == 32
    )
    out.rename(tmp_path / ".latents.old")  # the first rename done, the second not
    m = latents.run(params, root / "clean", root / "vae", root / "clip", out)
    assert (m["latents_encoded"], m["latents_reused"]) == (0, 32)
    assert not (tmp_path / ".latents.old").exists()
