"""train_vae.crop: the VAE trains on random windows of the images and is validated and
used on whole ones."""

from pathlib import Path

import pytest
import torch

from tests.test_vae_discriminator import Recorder, _clean
from training import config
from training.config import ConfigError
from training.engine.images import random_crops
from training.phases import vae


def test_crops_are_windows_on_the_latent_grid_and_split_like_the_batch():
    x = torch.arange(6 * 2 * 12 * 12, dtype=torch.float32).reshape(6, 2, 12, 12)
    whole = random_crops(x, 4, 4, torch.Generator().manual_seed(3))
    assert whole.shape == (6, 2, 4, 4)
    for img, crop in zip(x, whole, strict=True):
        found = [
            (y, c)
            for y in range(0, 9)
            for c in range(0, 9)
            if torch.equal(img[:, y : y + 4, c : c + 4], crop)
        ]
        assert len(found) == 1 and found[0][0] % 4 == 0 and found[0][1] % 4 == 0
    # two processes, each with its half of the global batch, cut the same windows
    halves = [
        random_crops(x[i : i + 3], 4, 4, torch.Generator().manual_seed(3), total=6, first=i)
        for i in (0, 3)
    ]
    assert torch.equal(torch.cat(halves), whole)
    assert random_crops(x, 12, 4, torch.Generator()) is x  # a side the image's: whole


def test_the_vae_trains_on_crops_and_is_measured_on_whole_images(tmp_path: Path):
    """Every training forward pass sees 16 px windows of the 32 px images; the val PSNR,
    the scaling factor and the saved model see whole images."""
    train_vae = {"steps": 4, "batch_size": 8, "warmup_steps": 0, "checkpoint_every": 4}
    params = config.resolve({"train_vae": {**train_vae, "crop": 16}})
    seen: list[tuple[int, ...]] = []
    real_encode = vae.AutoencoderKL.encode

    def encode(self, x, *a, **k):
        seen.append((torch.is_grad_enabled(), *x.shape[2:]))
        return real_encode(self, x, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vae.AutoencoderKL, "encode", encode)
        out = vae.run(params, _clean(tmp_path), tmp_path / "vae", tmp_path / "ckpt", Recorder())
    assert [s for s in seen if s[0]] == [(True, 16, 16)] * 4  # the 4 training steps
    assert {s[1:] for s in seen if not s[0]} == {(32, 32)}  # scaling factor, val
    assert out["latent_shape"] == [4, 8, 8] and out["val_psnr"] > 0


@pytest.mark.parametrize(
    ("crop", "needle"),
    [
        (30, "train_vae.crop 30 must be a multiple of the VAE's downsampling 4"),
        (32, "and below ingest.image_size 32"),
    ],
)
def test_a_crop_off_the_latent_grid_or_as_large_as_the_image_is_refused(crop, needle):
    with pytest.raises(ConfigError, match=needle):
        config.resolve({"train_vae": {"crop": crop}})  # tiny: 32 px, an f=4 VAE
    assert config.resolve({"train_vae": {"crop": 16}}).train_vae.crop == 16
