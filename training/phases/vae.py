"""Phase ``train_vae``: a ``diffusers.AutoencoderKL`` trained from scratch.

Loss = reconstruction (MSE by default, or L1) + beta * KL (Kingma & Welling; SD's first
stage uses a tiny KL weight so the latent stays close to a deterministic code). MSE is
the default because the built-in images are small saturated objects on black: an
L1-trained VAE here reconstructed red and green objects as dull grey, which capped the
whole model's colour accuracy (see the evaluation's ``ceiling_acc_all_vae_recon``).
After training the latent scaling factor is measured from data — 1 / std of training
latents, as SD's 0.18215 was — and written into the saved config, so the U-Net sees
unit-variance inputs.

With ``discriminator: true`` (the small and base profiles) a PatchGAN discriminator
(Isola et al. 2017, as in SD's first stage) joins after ``disc_start`` of the steps,
with hinge losses. Generator and discriminator train in one backward pass: the
generator's adversarial term sees the discriminator's weights detached, and the
discriminator's term sees the reconstruction detached, so each network gets only its
own gradient, and one optimizer, one checkpoint and the data-parallel all-reduce cover
both. Only the VAE is saved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn
from torch.func import functional_call

from training import engine as E
from training import paths as P
from training.config import Params
from training.engine import loaders
from training.engine.images import decode_image, psnr, random_crops, save_grid, ssim, to_tensor


def build(params: Params) -> AutoencoderKL:
    c = params.train_vae
    n = len(c.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=c.block_out_channels,
        layers_per_block=c.layers_per_block,
        latent_channels=c.latent_channels,
        norm_num_groups=c.norm_num_groups,
        sample_size=params.ingest.image_size,
    )


class PatchDiscriminator(nn.Module):
    """PatchGAN: a logit per overlapping patch, not per image. GroupNorm instead of the
    original BatchNorm, so it behaves the same at any batch size and across ranks."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(ch, out, 4, stride, 1), nn.GroupNorm(8, out), nn.LeakyReLU(0.2)]
            ch = out
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class VaeWithDiscriminator(nn.Module):
    """What the Trainer optimises when the discriminator is on (one module, one state)."""

    def __init__(self, vae: AutoencoderKL, disc: PatchDiscriminator):
        super().__init__()
        self.vae, self.disc = vae, disc

    def clip_groups(self) -> list:
        """Each network's gradient norm is clipped on its own (``Trainer._clip``): each
        gets only its own gradient, and neither's size scales the other's step."""
        return [self.vae.parameters(), self.disc.parameters()]


def adversarial_losses(
    disc: PatchDiscriminator, real: torch.Tensor, fake: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(generator loss, discriminator loss), hinge form, separated for one backward."""
    frozen = {k: v.detach() for k, v in disc.named_parameters()}
    g_loss = -functional_call(disc, frozen, (fake,)).mean()
    d_loss = 0.5 * (F.relu(1.0 - disc(real)).mean() + F.relu(1.0 + disc(fake.detach())).mean())
    return g_loss, d_loss


def image_split(params: Params, source: str, loader: str = "stream", train: bool = False):
    """A split of the clean images as ``{"x": float [N, 3, H, W]}`` batches; for training
    (``train=True``) in the stage's batch order, else read in order (``scan``)."""
    sizes = params.image_sizes()  # a bucketed split's batches have their own shapes
    c = params.train_vae

    def decode(sample: dict) -> np.ndarray:
        return decode_image(sample, sizes)

    def collate(images: list) -> dict[str, np.ndarray]:
        return {"x": np.stack(images)}  # uint8; the step makes floats (to_tensor)

    if not train:
        return loaders.Split(source, decode, collate)
    return loaders.make(loader, source, decode, collate, c.batch_size, params.seed, c.block_shards)


def run(
    params: Params,
    clean: str | Path,
    out_dir: Path,
    ckpt_dir: Path,
    log: E.MetricLogger | None = None,
) -> dict:
    """Train on ``clean/train``, validate on ``clean/val`` (a directory or an ``s3://``
    prefix), save to ``out_dir``."""
    log = log or E.NullLogger()
    c = params.train_vae
    torch.manual_seed(params.seed)
    batches = image_split(params, f"{clean}/train", c.loader, train=True)
    val = image_split(params, f"{clean}/val")
    try:
        return _train(params, batches, val, out_dir, ckpt_dir, log)
    finally:
        batches.close()
        val.close()


def _train(params, batches, val, out_dir: Path, ckpt_dir: Path, log: E.MetricLogger) -> dict:
    c = params.train_vae
    size = params.ingest.image_size
    E.say(f"train_vae: {len(batches)} train / {len(val)} val images at {size} px")

    model = build(params)
    n_params = sum(p.numel() for p in model.parameters())
    trained: nn.Module = model
    groups: list[dict] = [{"params": list(model.parameters())}]
    disc = None
    if c.discriminator:
        disc = PatchDiscriminator(c.disc_channels, c.disc_layers)
        trained = VaeWithDiscriminator(model, disc)
        groups.append({"params": list(disc.parameters()), "lr_scale": c.disc_lr_scale})
    opt = torch.optim.AdamW(
        groups, lr=c.lr, weight_decay=0.0, betas=(0.5, 0.9) if disc else (0.9, 0.999)
    )
    data_fp = batches.index.fingerprint()
    trainer = E.stage_trainer("train_vae", trained, opt, c, params.seed, ckpt_dir, data_fp, log)
    dev = trainer.device
    disc_from = int(c.disc_start * c.steps)
    down = 2 ** (len(c.block_out_channels) - 1)

    def step_fn(step: int) -> tuple[torch.Tensor, E.StepMetrics]:
        x = to_tensor(batches.batch(step)["x"])  # this process's slice of the global batch
        if c.crop:  # offsets drawn for the global batch, as the noise below
            g = E.step_generator(params.seed, step, stream=1)
            x = random_crops(x, c.crop, down, g, batches.global_batch, E.rank() * len(x))
        # the global batch's noise, then this process's slice (data parallel)
        latent_shape = (c.latent_channels, x.shape[2] // down, x.shape[3] // down)
        eps = torch.randn(
            (batches.global_batch, *latent_shape), generator=E.step_generator(params.seed, step)
        )
        x, eps = E.to_device(dev, x, *E.local(eps))
        post = model.encode(x).latent_dist
        z = post.mean + post.std * eps
        recon = model.decode(z).sample
        rec = F.l1_loss(recon, x) if c.recon_loss == "l1" else F.mse_loss(recon, x)
        kl = post.kl().mean() / x[0].numel()  # per-pixel, so beta is resolution-free
        loss = rec + c.kl_weight * kl
        metrics = {"recon": rec.detach(), "kl": kl.detach()}
        if disc is not None and step >= disc_from:
            g_loss, d_loss = adversarial_losses(disc, x, recon)
            loss = loss + c.disc_weight * g_loss + d_loss
            metrics.update(gan_g=g_loss.detach(), gan_d=d_loss.detach())
        return loss, metrics

    def reached(step: int) -> bool:
        """Early stop: val PSNR at or above ``target_psnr``. Every rank measures the same
        weights; the mean makes their decision one. Never with a discriminator: its term
        trades PSNR for texture, so PSNR cannot say when it is done (the curve is logged
        all the same)."""
        score = float(E.all_mean(torch.tensor(val_psnr(model, val, params), device=dev)))
        if E.is_main():
            log.log_metrics({"train_vae/val_psnr": score}, step)
        return disc is None and c.target_psnr is not None and score >= c.target_psnr

    summary = {
        **trainer.fit(step_fn, every=c.check_every, stop=reached),
        **batches.stats(),
    }
    if summary["steps_trained"] < c.steps and E.is_main():
        E.say(
            f"train_vae: val PSNR reached target_psnr {c.target_psnr} dB at step "
            f"{summary['steps_trained']} of {c.steps}; stopped there"
        )
    if not E.is_main():  # data parallel: rank 0 measures and saves
        return summary

    chunk = _chunk(size)
    with torch.no_grad():
        # Scaling factor from the data: posterior samples of up to 2k training images,
        # the first of epoch 0's (seeded) order, read in chunks.
        g = torch.Generator().manual_seed(params.seed)
        ids = batches.order.ids(0, 0, min(2048, batches.order.epoch_len))
        lat = []  # chunks never mix buckets (one shape per forward pass)
        for group in batches.by_bucket(ids):
            for i in range(0, len(group), chunk):
                x = to_tensor(batches.take(group[i : i + chunk])["x"]).to(dev)
                lat.append(model.encode(x).latent_dist.sample(generator=g).flatten())
        scaling = float(1.0 / torch.cat(lat).std())
    model.register_to_config(scaling_factor=scaling)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    metrics = {
        **measure(model, val, params, out_dir, log),
        "latent_shape": [c.latent_channels, size // down, size // down],
        "params": n_params,
        **summary,
    }
    return metrics


def _chunk(size: int) -> int:
    """Images per forward pass after training: 256 at 32 px, fewer as pixels grow, so
    the encoder's activations take the same memory at any image size."""
    return max(1, 256 * 32 * 32 // (size * size))


def _reconstructions(model: AutoencoderKL, val, params: Params):
    """(images, reconstructions from posterior means) of ``val_samples`` val images
    spread over the split (each bucket in proportion: ``Split.picked``), a chunk at a
    time, on the CPU and clamped to the images' range."""
    dev = next(model.parameters()).device
    with torch.no_grad():
        for b in val.scan(_chunk(params.ingest.image_size), params.train_vae.val_samples):
            x = to_tensor(b["x"])
            yield x, model(x.to(dev), sample_posterior=False).sample.cpu().clamp(-1, 1)


def val_psnr(model: AutoencoderKL, val, params: Params) -> float:
    """Mean val PSNR, as ``measure`` reports it (the early-stop check)."""
    was_training = model.training
    model.eval()
    try:
        scores = [psnr(recon, x) for x, recon in _reconstructions(model, val, params)]
        return float(np.mean(np.concatenate(scores)))
    finally:
        model.train(was_training)


def measure(model: AutoencoderKL, val, params: Params, out_dir: Path, log) -> dict:
    """Val PSNR and SSIM of ``model``'s reconstructions (posterior means) on the first
    ``val_samples`` val images, and a grid of the first 16 in ``out_dir``."""
    psnrs, ssim_sum, seen, first = [], 0.0, 0, None
    for x, recon in _reconstructions(model, val, params):
        psnrs.append(psnr(recon, x))
        ssim_sum += ssim(recon, x) * len(x)
        seen += len(x)
        if first is None:
            first = (x[:16], recon[:16])
    grid = out_dir / "reconstructions.png"
    save_grid(torch.cat(first), grid, nrow=len(first[0]))
    log.log_image(grid)
    scaling = model.config.scaling_factor
    metrics = {
        "val_psnr": float(np.mean(np.concatenate(psnrs))),
        "val_ssim": float(ssim_sum / seen),
        "val_samples": seen,
        "scaling_factor": scaling,
    }
    E.say(
        f"train_vae: val PSNR {metrics['val_psnr']:.2f} dB, SSIM {metrics['val_ssim']:.3f}, "
        f"scaling factor {scaling:.4f}"
    )
    return metrics


def reuse(params: Params, clean: str | Path, out_dir: Path, log, ref: str) -> dict:
    """``train_vae.reuse`` (or the champion's, ``mode: continue``): install that VAE
    instead of training one (its latent space, and its scaling factor, stay), then
    measure it on this data's val split."""
    from training.phases import reuse as R

    info = R.install("train_vae", ref, out_dir, params)
    model = AutoencoderKL.from_pretrained(out_dir).eval()
    val = image_split(params, f"{clean}/val")
    try:
        return {**info, **measure(model, val, params, out_dir, log)}
    finally:
        val.close()


def check_inputs(params: Params) -> None:
    """A model to reuse that cannot be, refused while ``data/models/vae`` is whole."""
    from training.phases.reuse import check_reused

    check_reused("train_vae", params)


def stage(params: Params, log: E.MetricLogger) -> dict:
    E.init_distributed()  # torch's threads; the process group under torchrun
    clean = loaders.split_source(P.CLEAN, "clean")
    from training.phases.reuse import builds_on

    ref = builds_on("train_vae", params)
    if ref:
        return reuse(params, clean, P.VAE, log, ref) if E.is_main() else {}
    return run(params, clean, P.VAE, P.CKPT / "train_vae", log)
