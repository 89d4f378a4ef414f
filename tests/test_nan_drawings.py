"""NaN pictures are an error everywhere Kiln draws outside ``sampling.generate`` (whose
own check is in tests/test_serving.py): the ControlNet's evaluation and the U-Net's and
ControlNet's training previews. diffusers draws NaN as black without a word, so they
were scored as samples, or saved as previews while the run went on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.loaderkit import shapes_split
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
