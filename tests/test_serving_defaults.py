"""What a caller gets when it leaves a setting out, the same whichever consumer it uses:
the ControlNet's scale its stage evaluated it at (``kiln_control.json``), the sampler
the pipeline was saved with, and the bounds and fields each entry point takes.

On a random-weight pipeline with the tiny profile's architectures
(``test_serving.build_tiny_pipeline``: nothing trained, nothing downloaded); 1-2 sampler
steps keep each draw under a second.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.test_serving import build_tiny_pipeline
from training import config
from training.cli.user import app
from training.inference import control, sampling

PROMPT = "a red circle at the top"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("defaults"))


def _generate(*args: str):
    return CliRunner().invoke(app, ["generate", *args], catch_exceptions=False)


def _manifest(out: Path) -> list[dict]:
    return [json.loads(t) for t in (out / "manifest.jsonl").read_text().splitlines()]


# ---- the ControlNet's scale ------------------------------------------------------------
@pytest.fixture(scope="module")
def controlnet(tiny: Path, tmp_path_factory) -> Path:
    """A fresh ControlNet of the tiny U-Net whose stage ran at conditioning_scale 0.5,
    its kiln_control.json written by the stage's own code."""
    from diffusers import UNet2DConditionModel

    from training.phases.controlnet import build, save_control_file

    out = tmp_path_factory.mktemp("controlnet") / "net"
    build(UNet2DConditionModel.from_pretrained(tiny / "unet"), 3).save_pretrained(out)
    c = config.resolve({"profile": "tiny", "train_controlnet": {"conditioning_scale": 0.5}})
    save_control_file(c.train_controlnet, tiny / "unet", out, "#102030")
    return out


def test_the_controlnet_stage_records_the_scale_it_evaluated_at(controlnet):
    """Was: kiln_control.json had the thresholds and the U-Net, not the scale, so its
    users could not know the scale the stage's control scores were measured at."""
    det = control.detector(controlnet)
    assert det["conditioning_scale"] == 0.5
    assert det["background"] == "#102030"  # what a transparent control picture lies on
    assert control.own_scale(det) == 0.5
    assert control.own_scale({"canny_low": 100, "canny_high": 200}) == 1.0  # older files


def test_rest_rows_without_a_control_scale_get_the_recorded_one(controlnet):
    """Was: 1.0, whatever the ControlNet was evaluated at."""
    from training.inference.text2image_model import parse_controls

    square = np.zeros((32, 32, 3), np.uint8)
    square[8:24, 8:24] = 255
    buf = io.BytesIO()
    Image.fromarray(square).save(buf, format="PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    frame = pd.DataFrame(
        {"prompt": ["a", "b"], "control": [png, png], "control_scale": [None, 2.0]}
    )
    got = parse_controls(frame, [(32, 32)] * 2, control.detector(controlnet))
    assert [c[1] for c in got] == [0.5, 2.0]
    older = {"canny_low": 100, "canny_high": 200}
    assert parse_controls(frame, [(32, 32)] * 2, older)[0][1] == 1.0


def test_generate_draws_at_the_controlnets_recorded_scale(
    tiny, controlnet, control_png, tmp_path, monkeypatch
):
    """Was: --control-scale defaulted to 1.0, not the scale the stage evaluated."""
    drawn_at = []
    real = sampling.generate

    def spy(pipe, reqs, *args, control=None, **kwargs):
        drawn_at.append(None if control is None else control[1])
        return real(pipe, reqs, *args, control=control, **kwargs)

    monkeypatch.setattr(sampling, "generate", spy)
    common = [PROMPT, "--steps", "1", "--model", str(tiny), "--control", str(control_png),
              "--controlnet", str(controlnet)]  # fmt: skip
    res = _generate(*common, "--out", str(tmp_path / "own"))
    assert res.exit_code == 0, res.output
    assert _manifest(tmp_path / "own")[0]["control_scale"] == 0.5
    res = _generate(*common, "--control-scale", "2", "--out", str(tmp_path / "asked"))
    assert res.exit_code == 0, res.output
    assert _manifest(tmp_path / "asked")[0]["control_scale"] == 2.0
    assert drawn_at == [0.5, 2.0]


def test_a_bad_recorded_scale_is_one_line_naming_the_controlnet(
    tiny, controlnet, control_png, tmp_path
):
    import shutil

    bad = shutil.copytree(controlnet, tmp_path / "bad")
    det = control.detector(bad) | {"conditioning_scale": "high"}
    (bad / control.CONTROL_FILE).write_text(json.dumps(det))
    out = tmp_path / "o"
    res = _generate(PROMPT, "--steps", "1", "--model", str(tiny), "--control",
                    str(control_png), "--controlnet", str(bad), "--out", str(out))  # fmt: skip
    assert res.exit_code == 1, res.output
    assert "conditioning_scale must be a number >= 0" in res.output
    assert "pass --control-scale" in res.output and not out.exists()


# ---- the sampler: the one the pipeline was saved with ------------------------------------
@pytest.fixture(scope="module")
def ddim_pipe(tiny: Path) -> Path:
    """The tiny model saved with DDIM, as evaluate saves it with evaluate.scheduler: ddim."""
    out = tiny.parent / "ddim-pipeline"
    if not out.exists():
        parts = tiny.parent
        pipe = sampling.assemble(parts / "vae", parts / "clip", parts / "unet", scheduler="ddim")
        pipe.save_pretrained(out, safe_serialization=True)
    return out


def _drawn(out: Path) -> tuple[np.ndarray, dict]:
    (line,) = _manifest(out)
    return np.asarray(Image.open(out / line["file"])), line


def test_generate_samples_with_the_models_own_scheduler(ddim_pipe, tmp_path):
    """Was: dpm++ whatever the pipeline was saved (and evaluated, and REST-served) with,
    so the same prompt, seed and steps drew another picture than the REST model."""
    common = [PROMPT, "--steps", "3", "--seed", "4", "--guidance", "2", "--model", str(ddim_pipe)]
    assert _generate(*common, "--out", str(tmp_path / "own")).exit_code == 0
    own, line = _drawn(tmp_path / "own")
    assert line["scheduler"] == "ddim"  # the one used, recorded
    assert _generate(*common, "--scheduler", "ddim", "--out", str(tmp_path / "ddim")).exit_code == 0
    assert np.array_equal(own, _drawn(tmp_path / "ddim")[0])
    # what the REST model draws: the saved pipeline's scheduler, untouched
    pipe = sampling.load(ddim_pipe)
    req = sampling.Request(PROMPT, 4, 3, 2.0)
    assert np.array_equal(own, np.asarray(sampling.generate(pipe, [req], 1)[0]))
    # an explicit --scheduler is still honoured, and recorded
    assert _generate(*common, "--scheduler", "euler", "--out", str(tmp_path / "eu")).exit_code == 0
    euler, line = _drawn(tmp_path / "eu")
    assert line["scheduler"] == "euler" and not np.array_equal(own, euler)


def _wait(ready, timeout: float = 120.0) -> None:
    import time

    end = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_the_playground_samples_with_each_versions_own_scheduler(ddim_pipe, tmp_path, monkeypatch):
    """Was: dpm++ unless the page named another (and it always named one)."""
    from training.playground import jobs

    monkeypatch.setattr("training.tracking.versions.resolve_version", lambda m: f"kiln/{m}")
    worker = jobs.Worker(tmp_path / "gallery")
    monkeypatch.setattr(worker, "pipeline_dir", lambda version: ddim_pipe)
    settings = jobs.Settings(prompt=PROMPT, steps=3, seed=4, guidance=2.0)
    assert settings.scheduler is None  # what a page or client that names none sends
    job = worker.submit(["1"], settings)
    _wait(lambda: job.state in ("done", "error"))
    assert job.state == "done", job.error
    (line,) = _manifest(tmp_path / "gallery")
    assert line["scheduler"] == "ddim" and job.results[0]["images"][0]["scheduler"] == "ddim"
    pipe = sampling.load(ddim_pipe)
    rest = sampling.generate(pipe, [sampling.Request(PROMPT, 4, 3, 2.0)], 1)[0]
    drawn = np.asarray(Image.open(tmp_path / "gallery" / line["file"]))
    assert np.abs(drawn.astype(int) - np.asarray(rest).astype(int)).max() <= 1
    # a named sampler is still honoured, and recorded
    job = worker.submit(["1"], jobs.Settings(prompt=PROMPT, steps=3, scheduler="euler"))
    _wait(lambda: job.state in ("done", "error"))
    assert job.state == "done", job.error
    assert _manifest(tmp_path / "gallery")[-1]["scheduler"] == "euler"


def test_the_playground_page_is_told_each_versions_own_scheduler(ddim_pipe, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from training.playground.app import create_app

    monkeypatch.setattr("training.tracking.versions.resolve_version", lambda m: f"kiln/{m}")
    app = create_app(tmp_path / "gallery")
    monkeypatch.setattr(app.state.worker, "pipeline_dir", lambda version: ddim_pipe)
    client = TestClient(app, base_url="http://127.0.0.1")
    assert client.get("/api/config").json()["defaults"]["scheduler"] is None
    model = client.get("/api/model", params={"ref": "1"}).json()
    assert model["scheduler"] == "ddim" and "ddim" in model["schedulers"], model


# ---- the playground's API: the fields a job takes ---------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [("negative_prompt", "blurry"), ("width", 64), ("height", 64), ("guidance_start", 0.4)],
)
def test_the_playground_refuses_a_field_a_job_does_not_take(
    tiny, tmp_path, monkeypatch, field, value
):
    """Was: dropped, and 200 with a job drawn without it (no negative prompt, the trained
    size, the version's own guidance start)."""
    from fastapi.testclient import TestClient

    from training.playground.app import create_app

    monkeypatch.setattr("training.tracking.versions.resolve_version", lambda m: f"kiln/{m}")
    app = create_app(tmp_path / "gallery")
    monkeypatch.setattr(app.state.worker, "pipeline_dir", lambda version: tiny)
    body = {"models": ["1"], "prompt": PROMPT, "steps": 1, field: value}
    answer = TestClient(app, base_url="http://127.0.0.1").post("/api/generate", json=body)
    assert answer.status_code == 400, answer.json()
    error = answer.json()["error"]
    assert error.startswith(f"unknown field {field!r} (a job takes models, prompt, negative,")
    if field == "negative_prompt":
        assert error.endswith("the same setting here is 'negative'")


# ---- kiln generate --guidance-start: check_request's [0, 1) ------------------------------
def test_generate_takes_every_guidance_start_check_request_takes(tiny, tmp_path):
    """Was: typer's max 0.99 refused 0.995, a start the config and the REST model take."""
    sampling.check_request(sampling.Request(PROMPT, 0, 2, 2.0, guidance_start=0.995))
    out = tmp_path / "o"
    res = _generate(PROMPT, "--steps", "2", "--guidance", "2", "--guidance-start", "0.995",
                    "--model", str(tiny), "--out", str(out))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert _manifest(out)[0]["guidance_start"] == 0.995


@pytest.mark.parametrize("value", ["1", "1.5", "nan", "-0.1"])
def test_generate_refuses_a_guidance_start_check_request_refuses(tmp_path, value):
    out = tmp_path / "o"
    res = _generate(PROMPT, "--guidance-start", value, "--model", "/nonexistent", "--out", str(out))
    assert res.exit_code == 2, res.output
    assert "Invalid value for '--guidance-start'" in res.output, res.output
    assert not out.exists()


# ---- kiln generate: options that would do nothing ----------------------------------------
@pytest.mark.parametrize(
    "extra",
    [["--control-scale", "5"], ["--control-is-map"], ["--controlnet", "/nonexistent/cn"]],
)
def test_generate_refuses_control_options_without_a_control(tiny, tmp_path, extra):
    """Found in review: accepted, and dropped without a word (exit 0, no control)."""
    out = tmp_path / "o"
    res = _generate(PROMPT, "--steps", "1", "--model", str(tiny), "--out", str(out), *extra)
    assert res.exit_code == 1 and "need --control" in res.output, res.output
    assert not out.exists()


def test_a_negative_prompt_at_guidance_1_is_not_recorded_as_used(tiny, tmp_path):
    """Found in review: at guidance 1 there is no unconditional branch, so the picture is
    the same with or without --negative, yet the manifest recorded it as used."""
    out = tmp_path / "o"
    args = [PROMPT, "--steps", "2", "--guidance", "1", "--model", str(tiny), "--out", str(out)]
    assert _generate(*args).exit_code == 0
    res = _generate(*args, "--negative", "a blue square")
    assert res.exit_code == 0 and "--negative does nothing at guidance 1" in res.output
    first, second = _manifest(out)
    assert second["negative_prompt"] == "" == first["negative_prompt"]
    same = [np.asarray(Image.open(out / x["file"])) for x in (first, second)]
    assert np.array_equal(*same)  # what the manifest now says: drawn without it
    res = _generate(*args[:4], "2", *args[5:], "--negative", "a blue square")
    assert res.exit_code == 0, res.output
    assert _manifest(out)[-1]["negative_prompt"] == "a blue square"  # used at 2
