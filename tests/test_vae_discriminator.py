"""The optional PatchGAN discriminator (small/base profiles), at a tiny size."""

import io
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from training import config
from training.engine.images import to_tensor
from training.intake import shards
from training.phases import vae


class Recorder:
    def __init__(self):
        self.metrics: dict[int, dict] = {}

    def log_metrics(self, metrics, step=None):
        self.metrics.setdefault(step, {}).update(metrics)

    def log_image(self, path, artifact_dir="images"):
        pass


def _clean(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("val", 8)):
        with shards.ShardWriter(tmp_path / "clean" / split, split, 100) as w:
            for i in range(n):
                img = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
                img = img.resize((32, 32), Image.Resampling.NEAREST)
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                w.write(shards.Record(f"{split}{i}", buf.getvalue(), "png", "x", {}))
    return tmp_path / "clean"


def test_discriminator_joins_late_trains_and_is_not_saved(tmp_path: Path):
    params = config.resolve(
        {
            "train_vae": {
                "steps": 8,
                "batch_size": 8,
                "log_every": 1,
                "checkpoint_every": 4,
                "warmup_steps": 0,
                "discriminator": True,
                "disc_start": 0.5,
                "disc_channels": 16,
                "disc_layers": 2,
            }
        }
    )
    assert config.resolve({"profile": "small"}).train_vae.discriminator
    assert not config.resolve({"profile": "tiny"}).train_vae.discriminator
    rec = Recorder()
    clean = _clean(tmp_path)
    out = vae.run(params, clean, tmp_path / "vae", tmp_path / "ckpt", rec)
    gan_steps = sorted(s for s, m in rec.metrics.items() if "train_vae/gan_d" in m)
    assert gan_steps == [5, 6, 7, 8]  # logged after steps 4..7 (0-based): the second half
    assert all(np.isfinite(rec.metrics[s]["train_vae/gan_g"]) for s in gan_steps)
    assert out["val_psnr"] > 0
    loaded = AutoencoderKL.from_pretrained(tmp_path / "vae")
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors").keys()
    assert not any(k.startswith("disc") for k in keys)
    ckpt = load_file(sorted((tmp_path / "ckpt").glob("step-*"))[-1] / "model.safetensors")
    assert any(k.startswith("disc.") for k in ckpt)  # checkpoints carry it, to resume
    x = to_tensor(shards.load_images(clean / "val")[0])
    with torch.no_grad():
        assert loaded(x, sample_posterior=False).sample.shape == x.shape


def test_adversarial_losses_send_each_gradient_to_its_own_network():
    torch.manual_seed(0)
    disc = vae.PatchDiscriminator(8, 2)
    real = torch.rand(2, 3, 32, 32)
    fake = torch.rand(2, 3, 32, 32, requires_grad=True)
    g_loss, _ = vae.adversarial_losses(disc, real, fake)
    g_loss.backward()
    assert fake.grad is not None and all(p.grad is None for p in disc.parameters())
    fake.grad = None
    _, d_loss = vae.adversarial_losses(disc, real, fake)
    d_loss.backward()
    assert fake.grad is None and all(p.grad is not None for p in disc.parameters())


def test_the_vae_stops_at_target_psnr_but_never_with_a_discriminator(tmp_path: Path):
    """A target any VAE meets stops training at the first check; with a discriminator
    the target is not a criterion (its term trades PSNR for texture), so every step
    runs, and val PSNR is still logged at each check."""
    clean = _clean(tmp_path)
    base = {
        "steps": 8,
        "batch_size": 8,
        "warmup_steps": 0,
        "checkpoint_every": 4,
        "check_every": 2,
        "target_psnr": 1.0,
    }
    for disc, trained, checks in ((False, 2, [2]), (True, 8, [2, 4, 6])):
        train_vae = {**base, "discriminator": disc, "disc_channels": 16, "disc_layers": 2}
        params = config.resolve({"train_vae": train_vae})
        rec = Recorder()
        out = vae.run(params, clean, tmp_path / f"vae{disc}", tmp_path / f"ck{disc}", rec)
        assert out["steps_trained"] == trained, disc
        logged = sorted(s for s, m in rec.metrics.items() if "train_vae/val_psnr" in m)
        assert logged == checks, disc
        assert (tmp_path / f"ck{disc}" / f"step-{trained:08d}" / "COMPLETE").is_file()
