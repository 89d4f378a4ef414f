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
    save_control_file(c.train_controlnet, tiny / "unet", out)
    return out


def test_the_controlnet_stage_records_the_scale_it_evaluated_at(controlnet):
    """Was: kiln_control.json had the thresholds and the U-Net, not the scale, so its
    users could not know the scale the stage's control scores were measured at."""
    det = control.detector(controlnet)
    assert det["conditioning_scale"] == 0.5
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


@pytest.fixture(scope="module")
def control_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("control") / "square.png"
    img = np.zeros((32, 32, 3), np.uint8)
    img[8:24, 8:24] = 255
    Image.fromarray(img).save(path)
    return path


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
