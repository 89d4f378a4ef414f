"""What ``kiln export``, ``kiln generate`` and the playground's gallery leave on the
user's filesystem: folders with the user's permissions, and on a full disk one line with
every picture written listed (README, "Reliability")."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import kiln, tmpfs
from tests.test_serving import build_tiny_pipeline
from training import disk
from training.cli import outputs
from training.cli.base import UserError
from training.cli.user import app
from training.playground import jobs

AGAIN = "run kiln generate again"


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_an_exported_folder_has_the_users_permissions(tmp_path, umask_022):
    """Was drwx------ whatever the umask (``tempfile.mkdtemp``): a team sharing the
    folder could not read the exported pipeline."""
    out = tmp_path / "exported"
    with outputs.whole_folder(out) as tmp:
        (tmp / "model_index.json").write_text("{}")
    assert out.stat().st_mode & 0o777 == 0o755
    os.umask(0o077)  # a private umask is the user's to choose, and kept
    private = tmp_path / "private"
    with outputs.whole_folder(private) as tmp:
        (tmp / "model_index.json").write_text("{}")
    assert private.stat().st_mode & 0o777 == 0o700


def _picture() -> Image.Image:
    return Image.new("RGB", (8, 8), (200, 30, 30))


def test_a_manifest_line_cut_by_a_full_disk_takes_its_picture_back(tmp_path, monkeypatch):
    out = tmp_path / "samples"
    with outputs.claimed(out) as (first, manifest):
        disk.save_picture(out / "0000-a-0.png", _picture(), manifest, {"file": "0000"}, 0, AGAIN)
        real = os.write

        def half_then_full(fd, data):
            if len(data) > 4:
                return real(fd, bytes(data[:4]))  # a short write, then no room
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "write", half_then_full)
        with pytest.raises(UserError) as info:
            disk.save_picture(
                out / "0001-a-1.png", _picture(), manifest, {"file": "0001"}, 1, AGAIN
            )
    assert "no space left for" in str(info.value) and "the 1 pictures" in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["0000-a-0.png", "manifest.jsonl"]
    assert (out / "manifest.jsonl").read_text() == '{"file": "0000"}\n'


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A real 12 KiB filesystem (tmpfs): room for about three tiny pictures."""
    with tmpfs(tmp_path / "disk", "12k") as disk:
        yield disk


def test_generate_onto_a_full_disk_says_so_and_lists_every_picture_written(tmp_path, tiny_disk):
    """Was: a traceback, a 0-byte PNG under its final name, and an empty manifest.jsonl
    (its buffered lines were lost when closing it failed too)."""
    tiny = build_tiny_pipeline(tmp_path / "m")
    out = tiny_disk / "samples"
    args = ["generate", "a red circle", "-n", "8", "--steps", "2", "--model", str(tiny)]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.exception.__class__ is SystemExit
    errors = [x for x in result.output.splitlines() if x.startswith("kiln: error:")]
    assert len(errors) == 1 and "no space left for" in errors[0], result.output
    lines = [json.loads(t) for t in (out / "manifest.jsonl").read_text().splitlines()]
    pictures = sorted(p.name for p in out.glob("*.png"))
    assert pictures and [x["file"] for x in lines] == pictures
    assert all((out / name).stat().st_size > 0 for name in pictures)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert f"the {len(pictures)} pictures before it" in errors[0]


def test_evaluate_refuses_a_tmpdir_too_small_for_registering_before_its_work(project, tiny_disk):
    """MLflow's log_model copies the whole pipeline into TMPDIR. On a small one,
    registration failed after the evaluation, as "MlflowException: The following
    failures occurred while downloading one or more artifacts", and the evaluation was
    removed with the stage's outputs. Now refused before any work, naming TMPDIR."""
    for folder in ("clean", "latents", "models/vae", "models/clip", "models/controlnet"):
        (project / "data" / folder).mkdir(parents=True)
        (project / "data" / folder / "x").write_bytes(b"x")
    (project / "data" / "models" / "unet").mkdir(parents=True)
    (project / "data" / "models" / "unet" / "weights").write_bytes(bytes(64 << 10))
    proc = kiln(project, "evaluate", check=False, env={"TMPDIR": str(tiny_disk)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("kiln: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"registering the pipeline copies it to {tiny_disk}: needs" in errors[0], errors[0]
    assert "point TMPDIR at a folder with room" in errors[0]
    assert not (project / "mlflow.db").exists()  # nothing started


def test_the_playground_gallery_on_a_full_disk_says_so_and_lists_every_picture(tmp_path, tiny_disk):
    """Was: the job's error "OSError: [Errno 28] No space left on device" and a 0-byte
    PNG under its final name in the gallery (``Image.save`` fails at closing the file);
    a manifest line went through a buffer flushed only at closing, so a full disk could
    cut it short and the next line appended to it was unreadable too. The job is queued
    as ``submit`` queues it once the registry has answered; the version is the tiny
    pipeline."""
    tiny = build_tiny_pipeline(tmp_path / "m")
    gallery = tiny_disk / "gallery"
    worker = jobs.Worker(gallery)
    worker.dirs["kiln-text2image/1"] = tiny  # what pipeline_dir fetched from the registry
    settings = jobs.Settings(prompt="a red circle", steps=1, n=8)
    job = jobs.Job("j1", ["1"], settings, ["kiln-text2image/1"])
    with worker.lock:
        worker.waiting.push("", job)
        worker.jobs[job.id] = job
        worker.lock.notify()
    end = time.monotonic() + 120
    while job.state not in jobs.FINISHED:
        assert time.monotonic() < end, job.state
        time.sleep(0.05)
    assert job.state == "error" and job.error.startswith("no space left for"), job.error
    assert "\n" not in job.error and "free space and draw again" in job.error
    lines = [json.loads(t) for t in (gallery / "manifest.jsonl").read_text().splitlines()]
    pictures = sorted(f"images/{p.name}" for p in (gallery / "images").iterdir())
    assert pictures and [x["file"] for x in lines] == pictures
    assert all((gallery / name).stat().st_size > 0 for name in pictures)
    assert not [p for p in (gallery / "images").iterdir() if p.name.startswith(".")]
    assert f"the {len(pictures)} pictures before it" in job.error
    assert [x["file"] for x in worker.recent()] == pictures[::-1]
