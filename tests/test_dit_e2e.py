"""The DiT backbone end to end, on the e2e run's data, VAE and CLIP (conftest's
``e2e_run``): ``kiln run`` with ``train_unet.backbone: dit`` stores SD3's text states,
trains the transformer as a rectified flow, evaluates, registers and exports a standard
``StableDiffusion3Pipeline``; and the engine's promises hold for it too: N processes
make the update of one, and a SIGKILLed run resumes to the same bits.

Quality is not asserted here (a few hundred steps); the DiT-vs-U-Net comparison at
tiny's budget is benchmarks/backbones.py's, in RESULTS.md."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from training import config

from .conftest import kiln, outputs_copy, py, sigkill_after_checkpoint, stage_losses

pytestmark = pytest.mark.e2e
WEIGHTS = Path("data/models/unet/diffusion_pytorch_model.safetensors")
CKPT = Path("data/checkpoints/train_unet")


@pytest.fixture(scope="module")
def dit(e2e_run, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A copy of the finished e2e project switched to the DiT, run again with ``kiln
    run``: DVC re-runs what the switch touches (precompute_latents, train_unet,
    evaluate) and takes the rest from its cache."""
    project = outputs_copy(e2e_run[0], tmp_path_factory.mktemp("dit") / "kiln")
    settings = {
        "train_unet.backbone": "dit",
        "train_unet.steps": 150,
        "train_unet.preview_every": 75,
        "evaluate.max_prompts": 24,
        "evaluate.sweep_prompts": 4,  # the report's figures, with the flow samplers
        "evaluate.sweep_steps": [4, 8],
    }
    config.set_values(project / "params.yaml", settings)
    proc = kiln(project, "run", "--dataset", "shapes", "--profile", "tiny", timeout=1800)
    return project, proc


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_kiln_run_trains_the_dit_on_sd3_text_states(dit):
    project, proc = dit
    assert "train_unet: dit backbone (flow objective)" in proc.stdout + proc.stderr
    manifest = _json(project / "data/latents/manifest.json")
    assert manifest["backbone"] == "dit"
    # penultimate CLIP states and the projected pooled vector, as SD3's pipeline takes them
    assert manifest["tensors"]["text"]["shape"][-1] == 64
    assert manifest["tensors"]["pooled"]["shape"] == [64]
    unet = project / "data/models/unet"
    assert _json(unet / "config.json")["_class_name"] == "SD3Transformer2DModel"
    assert _json(unet / "config.json")["joint_attention_dim"] == 128  # both CLIP slots
    assert _json(unet / "scheduler_config.json")["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    losses = stage_losses(project, "train_unet")
    assert losses[-1] < 0.8 * losses[0], losses  # it learns
    assert (unet / "previews" / "step-000075.png").is_file()
    evaluate = _json(project / "data/metrics/evaluate.json")
    assert 0 <= evaluate["acc_all"] <= 1 and evaluate["val_loss"] > 0
    assert (project / "data/eval/report.html").is_file()
    assert (project / "data/eval/trajectory.png").is_file()
    table = _json(project / "data/eval/steps_table.json")
    assert {r["scheduler"] for r in table} == {"dpm++", "euler"}  # the flow samplers


def test_the_registry_holds_the_dit_and_its_pipeline(dit):
    project, _ = dit
    out = py(
        project,
        """
import json
from mlflow import MlflowClient
from mlflow.models import get_model_info
from training import tracking
tracking.setup()
c = MlflowClient()
unet = c.get_model_version_by_alias("kiln-unet", "champion")
info = get_model_info(f"models:/kiln-unet/{unet.version}")
inputs = [i["name"] for i in info.signature.inputs.to_dict()]
champ = c.get_model_version_by_alias("kiln-text2image", "champion")
root = tracking.resolve_model_dir(f"models:/kiln-text2image/{champ.version}")
index = json.loads((root / "artifacts/pipeline/model_index.json").read_text())
print(json.dumps({"inputs": inputs, "loader": info.metadata["load_with"],
                  "pipeline": index["_class_name"]}))
""",
    )
    got = json.loads(out.strip().splitlines()[-1])
    assert got["inputs"] == [
        "hidden_states", "timestep", "encoder_hidden_states", "pooled_projections",
    ]  # fmt: skip
    assert got["loader"] == "diffusers.SD3Transformer2DModel.from_pretrained"
    assert got["pipeline"] == "StableDiffusion3Pipeline"


def test_the_pyfunc_serves_the_dit_pipeline(dit):
    """The registered kiln-text2image model (what `mlflow models serve` runs) loads the
    SD3 pipeline and returns PNGs, through the same code as for the U-Net."""
    project, _ = dit
    out = py(
        project,
        """
import base64, io
import mlflow, pandas as pd
from PIL import Image
from training import tracking
tracking.setup()
model = mlflow.pyfunc.load_model("models:/kiln-text2image@champion")
res = model.predict(pd.DataFrame({"prompt": ["a small white cross at the top"],
                                  "seed": [1], "steps": [6]}))
img = Image.open(io.BytesIO(base64.b64decode(res["image"][0])))
print(list(res.columns), img.size, img.format)
""",
    )
    assert "['prompt', 'seed', 'image', 'note'] (32, 32) PNG" in out


def test_export_loads_in_plain_diffusers_and_draws_what_kiln_generate_draws(dit, tmp_path):
    project, _ = dit
    proc = kiln(project, "export", str(tmp_path / "sd3"))
    assert "exported StableDiffusion3Pipeline" in proc.stdout
    kiln(project, "generate", "a large red circle in the center", "--seed", "5",
         "--steps", "6", "--scheduler", "euler", "--guidance", "4",
         "--out", str(tmp_path / "gen"))  # fmt: skip
    (png,) = (tmp_path / "gen").glob("*.png")
    out = py(
        project,
        f"""
import os, numpy as np, torch
from PIL import Image
os.environ["HF_HUB_OFFLINE"] = "1"
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
pipe = StableDiffusion3Pipeline.from_pretrained(
    {str(tmp_path / "sd3")!r}, text_encoder_3=None, tokenizer_3=None, local_files_only=True)
pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
img = pipe("a large red circle in the center", num_inference_steps=6, guidance_scale=4.0,
           generator=torch.Generator().manual_seed(5)).images[0]
ours = np.asarray(Image.open({str(png)!r}).convert("RGB"), dtype=float)
print(img.size, np.abs(np.asarray(img, dtype=float) - ours).max())
""",
    )
    size, diff = out.strip().splitlines()[-1].rsplit(" ", 1)
    assert size == "(32, 32)" and float(diff) <= 2, out


def test_dit_data_parallel_training_matches_one_process(dit, tmp_path):
    project, _ = dit
    curves = {}
    for nproc in (1, 2):
        copy = outputs_copy(project, tmp_path / f"nproc{nproc}")
        config.set_values(
            copy / "params.yaml",
            {"train_unet.steps": 30, "train_unet.log_every": 5, "train_unet.preview_every": 0},
        )
        proc = kiln(copy, "train-unet", timeout=900, env={"KILN_NPROC": str(nproc)})
        assert nproc == 1 or "2 data-parallel processes" in proc.stderr
        curves[nproc] = stage_losses(copy, "train_unet")
    one, two = curves[1], curves[2]
    assert len(one) == len(two) == 6
    assert max(abs(a - b) / abs(a) for a, b in zip(one, two, strict=True)) < 1e-3, (one, two)


def test_sigkilled_dit_training_resumes_bitwise_identical(dit, tmp_path):
    project = outputs_copy(dit[0], tmp_path / "resume")
    config.set_values(
        project / "params.yaml",
        {"train_unet.steps": 60, "train_unet.checkpoint_every": 10, "train_unet.preview_every": 0},
    )
    kiln(project, "train-unet")
    uninterrupted = load_file(project / WEIGHTS)
    assert not (project / CKPT).exists()  # finished: its resume state is gone

    killed_at = sigkill_after_checkpoint(project, "train-unet", project / CKPT, 20)
    assert 20 <= killed_at < 60, killed_at

    resumed = kiln(project, "train-unet")
    assert "resuming from step-" in resumed.stderr
    weights = load_file(project / WEIGHTS)
    assert weights.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert (weights[name] == tensor).all(), name
