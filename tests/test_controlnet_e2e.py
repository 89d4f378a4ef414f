"""The ControlNet end to end on the e2e run's data and models (conftest's ``e2e_run``):
off by default (the stage records a skip and registers nothing), and switched on,
``kiln run`` re-runs only ``train_controlnet``, which trains on the frozen U-Net,
measures control- and text-following with and without it, and registers
``kiln-controlnet``; ``kiln generate --control`` then draws the control's layout in the
prompt's colour, and refuses control images it cannot use by name."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from training import config
from training.evaluation.oracle import ShapesOracle
from training.inference.control import edges as canny
from training.intake import builtin as B

from .conftest import kiln, outputs_copy, py, sigkill_after_checkpoint

pytestmark = pytest.mark.e2e
CN = Path("data/models/controlnet")
CKPT = Path("data/checkpoints/train_controlnet")
STEPS = 400


@pytest.fixture(scope="module")
def controlled(e2e_run, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    project = outputs_copy(e2e_run[0], tmp_path_factory.mktemp("controlnet") / "kiln")
    settings = {"train_controlnet.enabled": True, "train_controlnet.steps": STEPS}
    config.set_values(project / "params.yaml", settings)
    proc = kiln(project, "run", "--dataset", "shapes", "--profile", "tiny", timeout=1800)
    return project, proc


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_the_default_run_skips_the_controlnet_and_says_so(e2e_run):
    project, _ = e2e_run
    assert _json(project / "data/metrics/train_controlnet.json")["skipped"] == (
        "train_controlnet.enabled is false"
    )
    assert not (project / CN / "config.json").exists()
    names = py(
        project,
        "from mlflow import MlflowClient\n"
        "print([m.name for m in MlflowClient().search_registered_models()])",
    )
    assert "kiln-controlnet" not in names and "kiln-unet" in names
    proc = kiln(project, "generate", "a red circle", "--control", "params.yaml", check=False)
    assert proc.returncode != 0
    assert "its stage was skipped: train_controlnet.enabled is false" in proc.stderr


def test_kiln_run_trains_only_the_controlnet_and_it_steers_the_layout(controlled, e2e_run):
    project, proc = controlled
    log = proc.stdout + proc.stderr
    assert "ControlNet" in log and "on the frozen U-Net" in log
    m = _json(project / "data/metrics/train_controlnet.json")
    assert m["control_eval_samples"] == 64 and m["registered_version"] == "1"
    # the base model alone can only guess size and position from `a {colour} {shape}`
    assert m["base_layout"] < 0.3, m
    assert m["controlnet_layout"] >= m["base_layout"] + 0.3, m
    assert m["controlnet_position"] >= 0.6, m
    # the text still decides the colour: near the base model's, far above chance (1/6)
    assert m["controlnet_colour"] >= max(0.6, m["base_colour"] - 0.15), m
    for name in ("control_eval.png", "control_report.html", "kiln_control.json"):
        assert (project / CN / name).is_file(), name
    assert _json(project / CN / "config.json")["_class_name"] == "ControlNetModel"
    # DVC re-ran only the switched-on stage: the U-Net and the evaluation are the e2e run's
    for stage in ("train_unet", "evaluate"):
        run_id = _json(e2e_run[0] / f"data/metrics/{stage}.json")["mlflow_run_id"]
        assert _json(project / f"data/metrics/{stage}.json")["mlflow_run_id"] == run_id, stage
    info = py(
        project,
        """
import json, mlflow
from mlflow import MlflowClient
v = MlflowClient().get_model_version("kiln-controlnet", "1")
sig = mlflow.models.get_model_info(f"models:/kiln-controlnet/1").signature
tag = v.tags.get("metric.controlnet_layout")
print(json.dumps({"inputs": [s.name for s in sig.inputs.inputs], "tag": tag}))
""",
    )
    got = json.loads(info.strip().splitlines()[-1])
    assert got["inputs"] == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond"]
    assert float(got["tag"]) == pytest.approx(m["controlnet_layout"])


def _control_png(path: Path, size: int = 32) -> Path:
    """A small white square in the top left: what the prompt does not say."""
    spec = B.ShapeSpec("square", "white", "small", "top", "left")
    side = 0.3 * size
    img = B.render_shape(spec, size, side, size / 6 + 1, size / 6 + 1)
    img.save(path)
    return path


def test_generate_draws_the_controls_layout_in_the_prompts_colour(controlled, tmp_path):
    """The prompt names colour and shape only; the control puts a small square in the
    top left. With the ControlNet most samples are there, in the prompt's colour; at
    --control-scale 0 (the base model alone) the same seeds are not."""
    project, _ = controlled
    control = _control_png(tmp_path / "control.png")
    oracle = ShapesOracle(0)
    reads, stderr = {}, {}
    for scale in ("1", "0"):
        out = tmp_path / f"scale{scale}"
        proc = kiln(project, "generate", "a green square", "--control", str(control),
                    "-n", "8", "--control-scale", scale, "--out", str(out),
                    "--model", "data/eval/pipeline")  # fmt: skip
        rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
        assert len(rows) == 8 and rows[0]["control"] == str(control)
        assert rows[0]["control_scale"] == float(scale)
        reads[scale] = [oracle.read(Image.open(out / r["file"])) for r in rows]
        stderr[scale] = proc.stderr
    top_left = {s: sum(r.found and (r.row, r.col) == ("top", "left") for r in v)
                for s, v in reads.items()}  # fmt: skip
    green = sum(r.found and r.colour == "green" for r in reads["1"])
    assert top_left["1"] >= 5 and green >= 6, reads["1"]
    assert top_left["0"] <= 2, reads["0"]
    assert "warning" not in stderr["1"]  # trained on this very U-Net


def test_generate_resizes_a_control_of_another_size_and_refuses_what_is_no_image(
    controlled, tmp_path
):
    project, _ = controlled
    big = _control_png(tmp_path / "big.png", size=96)
    proc = kiln(project, "generate", "a red circle", "--control", str(big),
                "--controlnet", "models:/kiln-controlnet/1",  # the registered one
                "--out", str(tmp_path / "o1"), "--model", "data/eval/pipeline")  # fmt: skip
    assert "96x96 resized to 32x32" in proc.stderr
    assert len(list((tmp_path / "o1").glob("*.png"))) == 1
    (tmp_path / "notes.txt").write_text("not a picture")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    for bad, why in (("notes.txt", "not an image"), ("dot.png", "too small")):
        proc = kiln(project, "generate", "a red circle", "--control", str(tmp_path / bad),
                    "--out", str(tmp_path / f"out-{bad}"), "--model", "data/eval/pipeline",
                    check=False)  # fmt: skip
        assert proc.returncode != 0 and why in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / f"out-{bad}").exists()  # nothing written for a refused request


def test_export_writes_a_controlnet_pipeline_that_draws_what_kiln_generate_draws(
    controlled, tmp_path
):
    project, _ = controlled
    proc = kiln(project, "export", str(tmp_path / "cn"), "--model", "data/eval/pipeline",
                "--controlnet", str(CN))  # fmt: skip
    assert "exported StableDiffusionControlNetPipeline" in proc.stdout
    edges = tmp_path / "edges.png"
    picture = np.asarray(Image.open(_control_png(tmp_path / "c.png")))
    Image.fromarray(canny(picture, 100, 200)).save(edges)
    kiln(project, "generate", "a blue cross", "--control", str(edges), "--control-is-map",
         "--seed", "5", "--steps", "6", "--model", "data/eval/pipeline",
         "--out", str(tmp_path / "gen"))  # fmt: skip
    (png,) = (tmp_path / "gen").glob("*.png")
    out = py(
        project,
        f"""
import os, numpy as np, torch
from PIL import Image
os.environ["HF_HUB_OFFLINE"] = "1"
from diffusers import StableDiffusionControlNetPipeline
pipe = StableDiffusionControlNetPipeline.from_pretrained({str(tmp_path / "cn")!r},
                                                         local_files_only=True)
img = pipe("a blue cross", image=Image.open({str(edges)!r}), num_inference_steps=6,
           guidance_scale=4.0, negative_prompt="",
           generator=torch.Generator().manual_seed(5)).images[0]
ours = np.asarray(Image.open({str(png)!r}).convert("RGB"), dtype=float)
print(type(pipe).__name__, img.size, np.abs(np.asarray(img, dtype=float) - ours).max())
""",
    )
    last = out.strip().splitlines()[-1]
    name, rest = last.split(" ", 1)
    size, diff = rest.rsplit(" ", 1)
    assert name == "StableDiffusionControlNetPipeline" and size == "(32, 32)", out
    assert float(diff) <= 2, out


def test_a_sigkilled_controlnet_resumes_bitwise_identical(controlled, tmp_path):
    """The shared engine's promise holds for the ControlNet, whose batches encode images
    and captions inside the step: killed mid-run and re-run, the same bits."""
    project = outputs_copy(controlled[0], tmp_path / "resume")
    settings = {"train_controlnet.steps": 40, "train_controlnet.checkpoint_every": 10,
                "train_controlnet.eval_samples": 0}  # fmt: skip
    config.set_values(project / "params.yaml", settings)
    weights = project / CN / "diffusion_pytorch_model.safetensors"
    kiln(project, "train-controlnet")
    uninterrupted = load_file(weights)
    shutil.rmtree(project / CKPT)

    killed_at = sigkill_after_checkpoint(project, "train-controlnet", project / CKPT, 10)
    assert 10 <= killed_at < 40, killed_at
    resumed = kiln(project, "train-controlnet")
    assert "resuming from step-" in resumed.stderr
    again = load_file(weights)
    assert again.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert (again[name] == tensor).all(), name
