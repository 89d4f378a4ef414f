"""A full disk while checkpointing ends in one line that names the checkpoint and the
space it needs, and leaves nothing half-written (issue #12, "Reliability").

The first two tests fill a real 2 MB tmpfs (this needs root and ``mount``; they skip
with the reason otherwise); the others fake the full disk and always run."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from training import engine as E
from training.engine import checkpoint

from .conftest import kiln

MB = 1 << 20


def _parts(width: int = 512) -> tuple[torch.nn.Module, torch.optim.Optimizer, E.EMA]:
    """A model of ``width**2`` floats (1 MiB at 512) with a stepped AdamW (two more
    tensors per weight) and an EMA: a checkpoint of about 4 MiB."""
    torch.manual_seed(0)
    model = torch.nn.Linear(width, width, bias=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    return model, opt, E.EMA(model, 0.9)


def _assert_one_line_disk_full(exc: BaseException, ckpt_dir: Path, step: int) -> None:
    # what training/cli.py's run_stage catches and prints as `kiln: error: <stage>: <msg>`
    assert isinstance(exc, OSError), type(exc)
    assert exc.errno in (errno.ENOSPC, errno.EDQUOT)  # so the flow does not retry it
    msg = str(exc)
    assert "\n" not in msg, msg
    assert str(ckpt_dir / f"step-{step:08d}") in msg, msg
    assert "needs" in msg and "free" in msg, msg


def _left_behind(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir()) if ckpt_dir.is_dir() else []


def test_full_disk_is_refused_before_writing(small_disk: Path):
    ckpt = E.Checkpointer(small_disk / "ck", "fp")
    model, opt, ema = _parts()
    with pytest.raises(Exception) as info:
        ckpt.save(4, model, opt, ema)
    _assert_one_line_disk_full(info.value, ckpt.dir, 4)
    assert "MB" in str(info.value)
    assert _left_behind(ckpt.dir) == []


def test_disk_filling_up_during_the_write_is_cleaned_up(small_disk, monkeypatch):
    # The free-space check passes (another writer fills the disk after it, say): the
    # 1 MiB model file is written, the 2 MiB optimizer file hits ENOSPC for real.
    real = shutil.disk_usage
    calls = []

    def first_call_sees_plenty(path):
        calls.append(path)
        usage = real(path)
        return usage._replace(free=1 << 40) if len(calls) == 1 else usage

    monkeypatch.setattr(shutil, "disk_usage", first_call_sees_plenty)
    ckpt = E.Checkpointer(small_disk / "ck", "fp")
    model, opt, ema = _parts()
    with pytest.raises(Exception) as info:
        ckpt.save(4, model, opt, ema)
    _assert_one_line_disk_full(info.value, ckpt.dir, 4)
    assert _left_behind(ckpt.dir) == []  # no .tmp-step-* with a partial model file
    # the disk is usable again: a smaller checkpoint fits and is complete
    small = E.Checkpointer(small_disk / "ck", "fp")
    model, opt, ema = _parts(width=64)
    final = small.save(8, model, opt, ema)
    assert (final / "COMPLETE").is_file() and _left_behind(small.dir) == ["step-00000008"]


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=MB))
    ckpt = E.Checkpointer(tmp_path / "data" / "checkpoints" / "train_unet", "fp")
    model, opt, ema = _parts()
    with pytest.raises(Exception) as info:
        ckpt.save(400, model, opt, ema)
    _assert_one_line_disk_full(info.value, ckpt.dir, 400)
    assert "needs 4.2 MB, 1.0 MB free" in str(info.value)  # 3 x 1 MiB tensors + EMA
    assert str(ckpt.dir.parent) in str(info.value)  # where to make room
    assert _left_behind(ckpt.dir) == []


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        # what safetensors raises (not an OSError: it would escape the CLI's handler)
        SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        ),
    ],
    ids=["ENOSPC", "EDQUOT", "SafetensorError"],
)
def test_write_error_from_a_full_disk_is_cleaned_up(tmp_path, monkeypatch, error):
    written = []

    def save_file(tensors, path, metadata=None):
        if written:  # the first file lands, the second does not
            raise error
        written.append(path)
        Path(path).write_bytes(b"partial")

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    ckpt = E.Checkpointer(tmp_path / "ck", "fp")
    model, opt, ema = _parts(width=64)
    with pytest.raises(Exception) as info:
        ckpt.save(12, model, opt, ema)
    _assert_one_line_disk_full(info.value, ckpt.dir, 12)
    assert _left_behind(ckpt.dir) == []


def test_other_write_errors_still_clean_up_and_pass_through(tmp_path, monkeypatch):
    def save_file(tensors, path, metadata=None):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    ckpt = E.Checkpointer(tmp_path / "ck", "fp")
    model, opt, ema = _parts(width=64)
    with pytest.raises(PermissionError):
        ckpt.save(12, model, opt, ema)
    assert _left_behind(ckpt.dir) == []


def test_earlier_checkpoints_survive_a_full_disk(tmp_path, monkeypatch):
    ckpt = E.Checkpointer(tmp_path / "ck", "fp")
    model, opt, ema = _parts(width=64)
    ckpt.save(4, model, opt, ema)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(OSError):
        ckpt.save(8, model, opt, ema)
    assert _left_behind(ckpt.dir) == ["step-00000004"]
    assert ckpt.restore(model, opt, ema) == 4


def test_disk_full_errors_guard_names_the_output(tmp_path):
    """For the phases' final ``save_pretrained`` (safetensors raises a bare Exception)."""
    out = tmp_path / "models" / "unet"
    with pytest.raises(OSError) as info, E.disk_full_errors("model", out, needed=5 * MB):
        raise SafetensorError("Error while serializing: I/O error: No space left on device")
    msg = str(info.value)
    assert msg.startswith(f"model {out}: needs 5.2 MB, ") and "\n" not in msg, msg
    with pytest.raises(SafetensorError), E.disk_full_errors("model", out):
        raise SafetensorError("Error while serializing: invalid dtype")  # not a disk error


def test_stage_whose_final_save_fills_the_disk_says_so_in_one_line(project: Path):
    """A full disk during a phase's final ``save_pretrained`` (safetensors raises a bare
    ``SafetensorError``) was a 50-line traceback with half a model folder left behind."""
    import json

    from training import config

    config.set_values(project / "params.yaml", {"ingest.num_samples": 200, "train_vae.steps": 2})
    kiln(project, "ingest")
    kiln(project, "validate")
    models = project / "data" / "models"
    models.mkdir(parents=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(models)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        proc = kiln(project, "train-vae", check=False)
        left = sorted(p.name for p in models.rglob("*"))
    finally:
        subprocess.run(["umount", "-l", str(models)], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("kiln: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "train_vae output data/models/vae" in errors[0] and "free" in errors[0], errors[0]
    assert left == [], left  # nothing half-written
    note = json.loads((project / ".kiln" / "failed-train_vae.json").read_text())
    assert note["retry"] is False  # a retry would fill the same disk
