"""The memorisation check flags a sample that is a copy of a training image (as the VAE
renders it) and not a new one, and measures real val images the same way."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from tests.loaderkit import SIZE, image_split
from training.engine import loaders
from training.engine.images import decode_image, to_tensor, to_uint8
from training.evaluation.metrics.memorisation import copy_scores


class BlurVAE(torch.nn.Module):
    """A lossy autoencoder stand-in: its "reconstruction" is a 2x2 average (what a VAE
    does to detail), so what it renders of an image is never the image itself."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # a device to be found on

    def forward(self, x, sample_posterior=False):
        blurred = torch.nn.functional.avg_pool2d(x, 2)
        return SimpleNamespace(sample=torch.nn.functional.interpolate(blurred, scale_factor=2))


def test_copies_of_training_images_are_flagged_and_new_images_are_not(tmp_path: Path):
    image_split(tmp_path / "train", n=120, size=SIZE)
    image_split(tmp_path / "val", n=12, size=SIZE, seed=1, prefix="val")
    vae = BlurVAE()
    train = loaders.Split(
        str(tmp_path / "train"),
        lambda s: decode_image(s, SIZE),
        lambda px: {"px": np.stack(px)},
    )
    try:
        # "samples": the VAE's own renderings of training images 5, 50, 100 (what a model
        # that memorised them would output) and of three images it never saw
        seen = train.take(np.array([5, 50, 100]))["px"].numpy()
        unseen = np.random.default_rng(9).integers(0, 255, (3, SIZE, SIZE, 3), dtype=np.uint8)
        with torch.no_grad():
            rendered = vae(to_tensor(np.concatenate([seen, unseen])), sample_posterior=False)
        samples = [Image.fromarray(u8) for u8 in to_uint8(rendered.sample.clamp(-1, 1))]
        val = [Image.fromarray(a) for a in train.take(np.arange(6))["px"].numpy()]  # "val"
        out = copy_scores(samples, val, train, vae, SIZE, threshold=0.02, limit=10**6)
    finally:
        train.close()
    assert out["copies"] == 3 and out["copies_frac"] == 0.5
    assert sorted(i for i, _, _ in out["memorisation_pairs"]) == [0, 1, 2]
    # the renderings are far from the training images themselves: only comparing with
    # the VAE's renderings of the training set finds the copies
    assert np.sqrt(((to_uint8(rendered.sample[:3]) / 255 - seen / 255) ** 2).mean()) > 0.05
    # the flagged pair shows the training image itself
    shown = {i: px for i, px, _ in out["memorisation_pairs"]}
    assert (shown[0] == seen[0]).all() and (shown[2] == seen[2]).all()
    # these "val" images are training images: their reconstructions land on them
    assert out["copies_frac_val"] == 1.0 and out["nn_train_dist_median_val"] < 0.01
    assert out["copy_search_samples"] == 120 and "copy_search_note" not in out
