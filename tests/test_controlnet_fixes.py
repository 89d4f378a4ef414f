"""ControlNet faults a user met, each with the run that showed it: the stage's resume,
and what ``kiln generate`` serves beside a retrained base model."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.loaderkit import shapes_split
from tests.test_serving import build_tiny_pipeline
from training import config


def _other_clip(clip_dir: Path, dest: Path) -> Path:
    """``clip_dir``'s tokenizer with other weights: a retrained text encoder."""
    from transformers import CLIPModel

    shutil.copytree(clip_dir, dest)
    model = CLIPModel.from_pretrained(clip_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(dest, safe_serialization=True)
    return dest


def test_a_checkpoint_of_another_text_encoder_is_not_resumed(tmp_path):
    """Was: the checkpoint's identity held the data, VAE and U-Net but not CLIP, so a run
    with another CLIP resumed (and finished) the ControlNet trained on the first one's
    text states. It now starts afresh, as a run with that CLIP alone would."""
    from training.phases import controlnet

    models = build_tiny_pipeline(tmp_path / "m").parent
    shapes_split(tmp_path / "clean/train", 16, 32)
    shapes_split(tmp_path / "clean/val", 8, 32, seed=1, prefix="val")
    clip_b = _other_clip(models / "clip", tmp_path / "clip_b")
    params = config.resolve({"train_controlnet": {
        "enabled": True, "steps": 2, "batch_size": 4, "checkpoint_every": 2,
        "preview_every": 0, "eval_samples": 0}})  # fmt: skip

    def train(clip_dir: Path, name: str, ckpt: str) -> dict:
        controlnet.run(params, tmp_path / "clean", models / "vae", clip_dir, models / "unet",
                       tmp_path / name, tmp_path / ckpt)  # fmt: skip
        return load_file(tmp_path / name / "diffusion_pytorch_model.safetensors")

    on_a = train(models / "clip", "a", "ckpt")  # leaves its step-2 checkpoint
    on_b = train(clip_b, "b", "ckpt")
    fresh_b = train(clip_b, "fresh_b", "ckpt_fresh")
    assert any(not torch.equal(on_a[k], on_b[k]) for k in on_a)  # was: all equal
    assert all(torch.equal(fresh_b[k], on_b[k]) for k in on_b)


def test_a_32_bit_control_picture_out_of_16_bit_range_is_refused_with_its_range():
    """Was: a 32-bit integer picture (mode I: a depth map in micrometres saved as a TIFF)
    was clipped to 16 bits, so its shape and background were both white: no edge, and
    the answer was silently the base model's."""
    from PIL import Image

    from training.inference.control import ControlImageError, load_control

    depth = np.full((32, 32), 70_000, np.int32)
    depth[8:24, 8:24] = 300_000
    buf = io.BytesIO()
    Image.fromarray(depth).save(buf, format="TIFF")
    with pytest.raises(ControlImageError, match=r"depth.tif: .* values 70000..300000;"):
        load_control(buf.getvalue(), (32, 32), False, 100, 200, name="depth.tif")
    negative = np.full((32, 32), -5, np.int32) + np.eye(32, dtype=np.int32) * 260
    with pytest.raises(ControlImageError, match="values -5..255;"):
        load_control(Image.fromarray(negative), (32, 32), False, 100, 200)
