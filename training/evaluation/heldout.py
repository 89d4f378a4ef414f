"""Held-out denoising loss: the validation metric diffusion users ask for first.

The training loss is too noisy to compare runs or spot overfitting: each step draws
its own timesteps and noise, and the loss depends mostly on the timestep. Here the
draws are fixed instead (kohya-ss/sd-scripts #1638, OneTrainer #368 ask for exactly
this): ``val_samples`` of the val latents, spread evenly over the split (each
aspect-ratio bucket in proportion: ``Split.picked``), each at the same ``val_timesteps``
timesteps, evenly spread over the schedule, with noise from a generator seeded with a
constant (``NOISE_SEED``, not the run's seed), conditioned on the sample's own caption.
The loss is the plain MSE to the prediction target, per timestep and averaged.

Two models scored here saw identical inputs, so their difference is the model's alone.
It compares models trained on the same latents (same VAE); across VAEs the latent
spaces differ and so do the numbers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

NOISE_SEED = 20_251_202  # fixed for every run, so two runs' losses are comparable


def timesteps(num_train_timesteps: int, count: int) -> list[int]:
    """``count`` timesteps at the centres of equal slices of the schedule."""
    return [int((k + 0.5) * num_train_timesteps / count) for k in range(count)]


def val_batches(source: str, limit: int, batch: int = 64) -> Iterator[dict[str, torch.Tensor]]:
    """``limit`` latents of the split at ``source`` (a directory or an ``s3://``
    prefix), spread evenly over it (``Split.picked``: the first ``limit`` were the
    square bucket's only), as ``{"mean", "std", "text"}`` batches of one shape each."""
    from training.engine import loaders

    split = loaders.Split(source, loaders.as_is, loaders.stack_rows)
    try:
        yield from split.scan(batch, limit)
    finally:
        split.close()


@torch.no_grad()
def denoising_loss(
    model: torch.nn.Module,
    sched,
    batches,
    scaling: float,
    count: int,
    device: torch.device,
    predict=None,
) -> dict[str, float]:
    """``val_loss`` and ``val_loss_t<t>`` per timestep over ``batches`` of
    ``{"mean", "text"}`` (posterior means and text states, as precomputed; and
    ``"pooled"`` for a backbone that takes it). ``predict(model, z_t, t, text)``: the
    backbone's call (default: the U-Net's). A flow-matching schedule (the DiT) noises
    on its straight line, t/T of the way to the noise, with the velocity as target."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if predict is None:
        from training.backbones.unet2d import predict
    flow = isinstance(sched, FlowMatchEulerDiscreteScheduler)
    was_training = model.training
    model.eval()
    ts = timesteps(sched.config.num_train_timesteps, count)
    sums = torch.zeros(len(ts), dtype=torch.float64)
    n = 0
    for b in batches:
        z0 = b["mean"].float() * scaling
        cond = {k: b[k].float().to(device) for k in ("text", "pooled") if k in b}
        # sample i's noise depends on i alone, not on how the samples are batched
        noise = torch.stack(
            [
                torch.randn(
                    (len(ts), *z0.shape[1:]),
                    generator=torch.Generator().manual_seed(NOISE_SEED + n + j),
                )
                for j in range(len(z0))
            ],
            dim=1,
        )  # [timestep, sample, ...]
        for i, t in enumerate(ts):
            tt = torch.full((len(z0),), t, dtype=torch.long)
            if flow:
                s = t / sched.config.num_train_timesteps
                zt, target, tt = (1 - s) * z0 + s * noise[i], noise[i] - z0, tt.float()
            else:
                zt = sched.add_noise(z0, noise[i], tt)
                target = (
                    noise[i]
                    if sched.config.prediction_type == "epsilon"
                    else sched.get_velocity(z0, noise[i], tt)
                )
            pred = predict(model, zt.to(device), tt.to(device), cond)
            err = F.mse_loss(pred.float().cpu(), target, reduction="none")
            sums[i] += err.flatten(1).mean(1).sum().item()
        n += len(z0)
    model.train(was_training)
    if n == 0:
        return {}
    per_t = (sums / n).tolist()
    out = {f"val_loss_t{t}": v for t, v in zip(ts, per_t, strict=True)}
    out["val_loss"] = sum(per_t) / len(per_t)
    out["val_loss_samples"] = float(n)
    return out
