"""NaN pictures are an error everywhere Kiln draws outside ``sampling.generate`` (whose
own check is in tests/test_serving.py): the ControlNet's evaluation and the U-Net's and
ControlNet's training previews. diffusers draws NaN as black without a word, so they
were scored as samples, or saved as previews while the run went on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.loaderkit import latents_dir, shapes_split
from tests.test_serving import build_tiny_pipeline
from training import config
from training.errors import NonFiniteSamples


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny pipeline's models, and a copy of its VAE with a NaN decoder: no part of
    the U-Net's or the ControlNet's loss (latents are precomputed; the ControlNet's step
    encodes only), so the training loop's NaN guard never sees it."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("tiny")
    pipe_dir = build_tiny_pipeline(root)
    vae = AutoencoderKL.from_pretrained(pipe_dir / "vae")
    with torch.no_grad():
        vae.post_quant_conv.weight.fill_(float("nan"))
    vae.save_pretrained(root / "nan-vae", safe_serialization=True)
    return root, root / "nan-vae"


def test_the_control_evaluation_refuses_nan_samples_naming_the_arm(tiny, tmp_path):
    from diffusers import UNet2DConditionModel

    from training import engine as E
    from training.backbones import get
    from training.evaluation.control import evaluate_control
    from training.phases.controlnet import build, control_split

    root = tiny[0]
    val = shapes_split(tmp_path / "val", n=2, size=32, seed=1, prefix="val")
    net = build(UNet2DConditionModel.from_pretrained(root / "unet"), 3)
    with torch.no_grad():  # a ControlNet whose weights went NaN
        for p in net.controlnet_mid_block.parameters():
            p.fill_(float("nan"))
    c = {"enabled": True, "eval_samples": 2}
    params = config.resolve({"profile": "tiny", "train_controlnet": c, "evaluate": {"steps": 2}})
    split = control_split(params, str(val), get("unet2d").text_encoder(root / "clip")[0], False)
    dirs = (root / "vae", root / "clip", root / "unet")
    with pytest.raises(NonFiniteSamples, match=r"^train_controlnet evaluation, with the Control"):
        evaluate_control(params, dirs, net, tmp_path, split, E.NullLogger())
    assert not (tmp_path / "control_eval.json").exists()  # no scores of black pictures


def _no_model(out: Path) -> None:
    assert not (out / "config.json").exists()  # nothing saved, so nothing registered
    assert not list((out / "previews").glob("*.png"))  # no black preview either


def test_a_unet_preview_that_comes_out_nan_stops_the_stage(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    from training.phases import unet

    lat = latents_dir(tmp_path / "latents", n=8, latent=(4, 8, 8), text=(24, 64), n_val=4)
    null = load_file(lat / "null_text.safetensors")  # unbatched, as precompute writes it
    save_file({k: v[0].contiguous() for k, v in null.items()}, lat / "null_text.safetensors")
    steps = {"steps": 2, "preview_every": 2, "val_samples": 4, "batch_size": 4}
    params = config.resolve({"profile": "tiny", "train_unet": steps})
    with pytest.raises(NonFiniteSamples, match=r"^train_unet: the preview at step 2: 2 of 2"):
        unet.run(params, lat, tiny[1], tmp_path / "out", tmp_path / "ck")
    _no_model(tmp_path / "out")


def test_a_controlnet_preview_that_comes_out_nan_stops_the_stage(tiny, tmp_path):
    from training.phases import controlnet

    shapes_split(tmp_path / "clean" / "train", n=4, size=32)
    shapes_split(tmp_path / "clean" / "val", n=2, size=32, seed=1, prefix="val")
    c = {"enabled": True, "steps": 1, "preview_every": 1, "batch_size": 2, "eval_samples": 0}
    params = config.resolve({"profile": "tiny", "train_controlnet": c})
    root, out = tiny[0], tmp_path / "out"
    with pytest.raises(NonFiniteSamples, match=r"^train_controlnet: the preview at step 1: 2 of"):
        controlnet.run(params, tmp_path / "clean", tiny[1], root / "clip", root / "unet", out,
                       tmp_path / "ck")  # fmt: skip
    _no_model(out)
