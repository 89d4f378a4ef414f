"""train_vae.crop: the VAE trains on random windows of the images and is validated and
used on whole ones."""

from pathlib import Path

import pytest
import torch

from tests.test_vae_discriminator import Recorder, _clean
from training import config
from training.config import ConfigError
from training.engine.images import random_crops, to_tensor
from training.intake import shards
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
    # a wide bucket: the window is as tall as the picture and slides along its width
    wide = torch.arange(3 * 8 * 16, dtype=torch.float32).reshape(1, 3, 8, 16).repeat(4, 1, 1, 1)
    cut = random_crops(wide, 12, 4, torch.Generator().manual_seed(0))
    assert cut.shape == (4, 3, 8, 12)
    assert all(any(torch.equal(wide[0, :, :, c : c + 12], w) for c in (0, 4)) for w in cut)


def test_the_vae_trains_on_crops_and_is_measured_on_whole_images(tmp_path: Path):
    """Every training forward pass sees 16 px windows of the 32 px images; the val PSNR
    and the scaling factor see whole images, and the saved VAE encodes them whole."""
    train_vae = {"steps": 4, "batch_size": 8, "warmup_steps": 0, "checkpoint_every": 4}
    params = config.resolve({"train_vae": {**train_vae, "crop": 16}})
    seen: list[tuple[int, ...]] = []
    real_encode = vae.AutoencoderKL.encode

    def encode(self, x, *a, **k):
        seen.append((torch.is_grad_enabled(), *x.shape[2:]))
        return real_encode(self, x, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vae.AutoencoderKL, "encode", encode)
        clean = _clean(tmp_path)
        out = vae.run(params, clean, tmp_path / "vae", tmp_path / "ckpt", Recorder())
    assert [s for s in seen if s[0]] == [(True, 16, 16)] * 4  # the 4 training steps
    assert {s[1:] for s in seen if not s[0]} == {(32, 32)}  # scaling factor, val
    assert out["val_psnr"] > 0
    saved = vae.AutoencoderKL.from_pretrained(tmp_path / "vae")
    x = to_tensor(shards.load_images(clean / "val")[0][:2])
    with torch.no_grad():
        assert saved.encode(x).latent_dist.mean.shape == (2, 4, 8, 8)
        assert saved(x, sample_posterior=False).sample.shape == x.shape


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"crop": 30}, "train_vae.crop 30 must be a multiple of the VAE's downsampling 4"),
        ({"crop": 32}, "and below ingest.image_size 32"),
        # the PatchGAN's convolutions fail on 16 px, at the step it joins (was: accepted,
        # and the run crashed halfway through)
        (
            {"crop": 16, "discriminator": True},
            "its 3 layers need pictures of at least 24 px a side, and the VAE trains on 16 px",
        ),
    ],
)
def test_a_crop_off_the_grid_as_large_as_the_image_or_too_small_is_refused(raw, needle):
    with pytest.raises(ConfigError, match=needle):
        config.resolve({"train_vae": raw})  # tiny: 32 px, an f=4 VAE
    assert config.resolve({"train_vae": {"crop": 16}}).train_vae.crop == 16
    assert config.resolve({"train_vae": {"crop": 24, "discriminator": True}}).train_vae.crop


def test_the_patchgan_side_rule_is_the_discriminators_own():
    for layers in (2, 3):
        disc = vae.PatchDiscriminator(8, layers)
        for side in (16, 23, 24, 32, 64):
            want = config.patchgan_side(side, layers)
            if want < 1:
                with pytest.raises(RuntimeError):
                    disc(torch.zeros(1, 3, side, side))
            else:
                assert disc(torch.zeros(1, 3, side, side)).shape[-1] == want


def test_a_bucket_side_the_patchgan_cannot_take_is_refused():
    # 48 px buckets at a 16 px stride include 32x64: four layers need 48 px, so the 32 px
    # side failed where the discriminator joined (was: accepted, the square checked alone)
    raw = {
        "ingest": {"image_size": 48, "bucket_stride": 16},  # buckets: the default
        "train_vae": {"discriminator": True, "disc_layers": 4},
    }
    assert (32, 64) in config.resolve({"ingest": raw["ingest"]}).image_sizes()
    with pytest.raises(ConfigError, match="need pictures of at least 48 px a side, and the VAE"):
        config.resolve(raw)
    with pytest.raises(RuntimeError):  # the discriminator itself, on that bucket
        vae.PatchDiscriminator(8, 4)(torch.zeros(1, 3, 32, 64))
    square = {**raw, "ingest": {"image_size": 48, "resize_mode": "center_crop"}}
    assert config.resolve(square).train_vae.disc_layers == 4  # 48 px squares take four
