"""Fixes to sampling input and outputs: the guidance range, ``kiln generate`` into a folder
that already holds pictures, the playground forgetting jobs still queued, and control
images too large to decode.

On a random-weight pipeline with the tiny profile's architectures
(``test_serving.build_tiny_pipeline``: nothing trained, nothing downloaded) where a
picture must really be drawn; 2 sampler steps keep each draw under a second.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.test_serving import build_tiny_pipeline
from training.cli.base import UserError
from training.cli.outputs import next_index
from training.cli.user import app
from training.inference import control, sampling
from training.inference.defaults import SAMPLER_FILE
from training.playground import jobs

PROMPT = "a red circle at the top"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("fixes"))


def _with_own_guidance(tiny: Path, dest: Path, guidance: float) -> Path:
    """A copy of the tiny pipeline whose evaluation 'chose' ``guidance``."""
    shutil.copytree(tiny, dest)
    (dest / SAMPLER_FILE).write_text(json.dumps({"guidance": guidance, "guidance_start": 0.0}))
    return dest


def _generate(*args: str):
    return CliRunner().invoke(app, ["generate", *args], catch_exceptions=False)


# ---- 1. guidance: [1, 100] -----------------------------------------------------------------
@pytest.mark.parametrize("bad", [0.0, 0.5, 0.999, 100.5, 1e39, math.inf, math.nan, -1.0])
def test_check_request_refuses_guidance_outside_1_to_100(bad):
    """Were: 0 <= g < 1 accepted (diffusers draws the g = 1 picture, the manifest records
    g) and 1e39 accepted (a NaN, all-black picture answered 200)."""
    with pytest.raises(ValueError, match=r"^guidance must be a number in \[1, 100\]") as exc:
        sampling.check_request(sampling.Request(PROMPT, 0, 4, bad))
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("good", [1, 1.0, 2.5, 100, 100.0])
def test_check_request_takes_guidance_from_1_to_100(good):
    sampling.check_request(sampling.Request(PROMPT, 0, 4, good))


@pytest.mark.parametrize("value", ["0.5", "0", "100.5"])
def test_generate_guidance_option_has_check_requests_range(tmp_path, value):
    """The CLI refuses in its parser what check_request refuses (was: min 0)."""
    out = tmp_path / "o"
    res = _generate(PROMPT, "--guidance", value, "--model", "/nonexistent", "--out", str(out))
    assert res.exit_code == 2, res.output
    assert "Invalid value for '--guidance'" in res.output, res.output
    assert not out.exists()


def test_generate_refuses_a_models_own_guidance_below_1(tiny, tmp_path):
    """A kiln_sampler.json scale below 1 (evaluate.guidance allows it) was drawn as 1
    and recorded as asked; now one line naming the model, before loading it."""
    model = _with_own_guidance(tiny, tmp_path / "pipe", 0.5)
    out = tmp_path / "o"
    res = _generate(PROMPT, "--model", str(model), "--out", str(out), "--steps", "2")
    assert res.exit_code == 1, res.output
    assert "the model's own sampler setting: guidance must be" in res.output, res.output
    assert "Traceback" not in res.output
    assert not out.exists()
    # the caller's own scale is taken: the model's is then not used
    res = _generate(PROMPT, "--model", str(model), "--out", str(out), "--steps", "2",
                    "--guidance", "2", "--guidance-start", "0")  # fmt: skip
    assert res.exit_code == 0, res.output


def test_playground_job_refuses_a_versions_own_guidance_below_1(tiny, tmp_path, monkeypatch):
    """The page leaves the scale to the version: one below 1 was drawn as 1 and put in
    the gallery's manifest as asked. Now the job fails saying why."""
    model = _with_own_guidance(tiny, tmp_path / "pipe", 0.5)
    monkeypatch.setattr("training.tracking.versions.resolve_version", lambda m: f"kiln/{m}")
    worker = jobs.Worker(tmp_path / "gallery")
    monkeypatch.setattr(worker, "pipeline_dir", lambda version: model)
    job = worker.submit(["1"], jobs.Settings(prompt=PROMPT, steps=2))
    _wait(lambda: job.state in ("done", "error"))
    assert job.state == "error", job.results
    assert "kiln/1's own sampler setting: guidance must be" in job.error, job.error
    assert not (tmp_path / "gallery" / "manifest.jsonl").exists()


# ---- 2. kiln generate into a folder that already holds pictures ---------------------------
def test_next_index_continues_after_pictures_and_manifest_lines(tmp_path):
    assert next_index(tmp_path / "missing") == 0
    assert next_index(tmp_path) == 0
    (tmp_path / "0007-a-red-circle-3.png").write_bytes(b"")
    (tmp_path / "notes.png").write_bytes(b"")  # not one of kiln generate's names
    assert next_index(tmp_path) == 8
    (tmp_path / "manifest.jsonl").write_text("{}\n" * 12 + '{"cut by a cr')
    assert next_index(tmp_path) == 13  # the manifest is ahead: pictures were deleted
    (tmp_path / "manifest.jsonl").unlink()
    (tmp_path / "manifest.jsonl").mkdir()
    with pytest.raises(UserError, match="manifest.jsonl is not a file"):
        next_index(tmp_path)


def test_generate_twice_into_one_folder_keeps_every_picture(tiny, tmp_path):
    """Were: the second run wrote 0000-... again over the first picture while the
    manifest's first line still described the first run's guidance."""
    out = tmp_path / "o"
    common = [PROMPT, "--model", str(tiny), "--out", str(out), "--steps", "2"]
    first = _generate(*common, "--guidance", "1", "-n", "2")
    assert first.exit_code == 0, first.output
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    second = _generate(*common, "--guidance", "7")
    assert second.exit_code == 0, second.output
    lines = [json.loads(t) for t in (out / "manifest.jsonl").read_text().splitlines()]
    files = [line["file"] for line in lines]
    assert [f[:4] for f in files] == ["0000", "0001", "0002"], files
    assert [line["guidance"] for line in lines] == [1.0, 1.0, 7.0]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(files)
    for name, data in before.items():  # the first run's pictures are untouched
        assert (out / name).read_bytes() == data, name


def test_two_generate_runs_at_once_into_one_folder_keep_every_picture(tiny, tmp_path):
    """Were: each run took its first number when it started and wrote when it finished,
    so two runs at once both wrote 0000-<prompt>-<seed>.png, the second over the first,
    with two manifest lines naming one file. Two real processes, same prompt and seeds."""
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "training.cli", "generate", PROMPT, "--model", str(tiny),
           "--out", str(out), "--steps", "8", "-n", "3"]  # fmt: skip
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]  # fmt: skip
    for run in runs:
        output = run.communicate(timeout=300)[0]
        assert run.returncode == 0, output
    files = [json.loads(t)["file"] for t in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(files) == sorted(p.name for p in out.glob("*.png")), files
    assert sorted(f[:4] for f in files) == [f"{i:04d}" for i in range(6)], files


# ---- 3. the playground keeps every job still waiting or running ---------------------------
def _wait(ready, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_playground_never_forgets_a_queued_or_running_job(tmp_path, monkeypatch):
    """Were: past KEEP_JOBS jobs the oldest were dropped whatever their state, so with
    --queue above KEEP_JOBS a waiting client got 404 while the worker still drew its job.
    The real Worker, its runner blocked; KEEP_JOBS lowered so the test stays small."""
    monkeypatch.setattr(jobs, "KEEP_JOBS", 3)
    monkeypatch.setattr("training.tracking.versions.resolve_version", lambda m: f"kiln/{m}")
    release, ran = threading.Event(), []

    def blocked(self, job):
        ran.append(job.id)
        assert release.wait(60)

    monkeypatch.setattr(jobs.Worker, "_run", blocked)
    worker = jobs.Worker(tmp_path / "gallery", max_queue=10, max_per_client=10)  # one client
    try:
        first = [worker.submit(["1"], jobs.Settings(prompt=PROMPT)) for _ in range(8)]
        _wait(lambda: ran)  # one runs, seven wait
        views = [worker.view(j.id) for j in first]
        assert all(v is not None for v in views), [v and v["state"] for v in views]
        assert [v["state"] for v in views] == ["running"] + ["queued"] * 7
        assert [v["position"] for v in views] == [None, 1, 2, 3, 4, 5, 6, 7]
    finally:
        release.set()
    _wait(lambda: all(j.state == "done" for j in first))
    last = worker.submit(["1"], jobs.Settings(prompt=PROMPT))
    # now finished, the oldest are forgotten down to KEEP_JOBS; the newest are kept
    assert len(worker.jobs) == 3
    assert [worker.view(j.id) is not None for j in first] == [False] * 6 + [True] * 2
    assert worker.view(last.id) is not None


# ---- 4. control images too large to decode ------------------------------------------------
def _bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of any size, a few KB on disk (made row by row, never
    as a whole picture in memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    z, row, parts = zlib.compressobj(), b"\0" * (1 + (width + 7) // 8), []
    for _ in range(height):
        parts.append(z.compress(row))
    parts.append(z.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )


def test_a_control_image_over_the_pixel_bound_is_refused_before_decoding(tmp_path):
    """Were: decoded (a 9000x9000 picture is ~240 MB as RGB; just under Pillow's own
    limit, ~850 MB) and used."""
    data = _bilevel_png(9000, 9000)
    assert len(data) < 100_000
    with pytest.raises(control.ControlImageError, match=r"row 0: control: 9000x9000 pixels is"):
        control.load_control(data, (32, 32), False, 100, 200, name="row 0: control")
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.raises(control.ControlImageError, match="too large a control image"):
        control.open_control(path)
    # a wide picture under the bound still opens
    assert control.open_control(_bilevel_png(8192, 128)).size == (8192, 128)


def test_a_decompression_bomb_is_a_control_image_error(tmp_path):
    """Were: PIL.Image.DecompressionBombError (not an OSError) escaped: a traceback from
    kiln generate --control, a generic error over REST."""
    data = _bilevel_png(20000, 20000)  # past Pillow's own limit: refused by Image.open
    with pytest.raises(control.ControlImageError, match="the control image: declares more"):
        control.open_control(data)
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    from training.cli.control import open_control  # what kiln generate --control calls

    with pytest.raises(UserError, match="bomb.png: declares more pixels"):
        open_control(path)


def test_a_control_picture_handed_in_decoded_is_bounded_too(monkeypatch):
    from PIL import Image

    monkeypatch.setattr(control, "MAX_PIXELS", 64 * 64)  # a small bound, a small picture
    with pytest.raises(control.ControlImageError, match="the control image: 65x64 pixels"):
        control.open_control(Image.new("L", (65, 64)))
    assert control.open_control(Image.new("L", (64, 64))).size == (64, 64)


def test_a_pipeline_with_pickled_weights_is_refused(tiny, tmp_path):
    """Found in review: a registry version whose U-Net came as diffusion_pytorch_model.bin
    (a pickle) in place of safetensors loaded anyway; only safetensors are read now."""
    import torch
    from safetensors.torch import load_file

    pipe_dir = shutil.copytree(tiny, tmp_path / "pickled")
    weights = pipe_dir / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()
    with pytest.raises(Exception, match="safetensors"):
        sampling.load(pipe_dir)
