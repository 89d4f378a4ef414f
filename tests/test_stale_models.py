"""A stage that pairs the U-Net with the VAE and CLIP (evaluate, train_controlnet) run by
hand after one of them was trained again (`kiln train-vae`, then `kiln evaluate`) had
the U-Net of the old latent space sampled through the new VAE, and registered as this
run's model: every shape fitted. Refused before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import resolve
from training.errors import UserError
from training.phases.latent_cache import model_fingerprint
from training.phases.reuse import TRAINED_ON


def _models(root: Path) -> dict[str, Path]:
    """A VAE, a CLIP and a U-Net folder (configs only), the U-Net recording both."""
    dirs = {k: root / k for k in ("vae", "clip", "unet")}
    for name, d in dirs.items():
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"name": name}))
    spaces = {k: model_fingerprint(dirs[k]) for k in ("vae", "clip")}
    (dirs["unet"] / TRAINED_ON).write_text(json.dumps(spaces))
    return dirs


@pytest.mark.parametrize("retrained", ["vae", "clip"])
def test_evaluate_refuses_a_unet_of_other_latents(tmp_path: Path, retrained: str):
    from training.evaluation import evaluate

    d = _models(tmp_path)
    (d[retrained] / "config.json").write_text(json.dumps({"name": retrained, "lr": 1}))
    out = tmp_path / "eval"
    with pytest.raises(UserError, match=rf"{d['unet']} was trained on the latents of other"):
        evaluate.run(resolve({}), tmp_path / "clean", d["vae"], d["clip"], d["unet"], out)
    assert not out.exists()  # nothing sampled, saved or registered


def test_train_controlnet_refuses_a_unet_of_other_latents(tmp_path: Path):
    from training.phases import controlnet

    d = _models(tmp_path)
    (d["vae"] / "diffusion_pytorch_model.safetensors").write_bytes(b"other weights")
    params = resolve({"train_controlnet": {"enabled": True}})
    with pytest.raises(UserError, match=r"VAE \w+ there, \w+ in .*vae"):
        controlnet.run(params, tmp_path / "clean", d["vae"], d["clip"], d["unet"],
                       tmp_path / "cn", tmp_path / "ck")  # fmt: skip


def test_the_models_it_was_trained_on_pass(tmp_path: Path):
    from training.phases.reuse import check_trained_on

    d = _models(tmp_path)
    check_trained_on(d["unet"], {"vae": d["vae"], "clip": d["clip"]})
    (d["unet"] / TRAINED_ON).unlink()  # a U-Net saved before Kiln recorded its spaces
    (d["vae"] / "config.json").write_text("{}")
    check_trained_on(d["unet"], {"vae": d["vae"], "clip": d["clip"]})
