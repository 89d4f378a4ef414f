"""U-Net training throughput and memory on a CUDA GPU, for the `small` and `base` profiles.

Usage (from the repository root, on a machine with a CUDA GPU):
    python benchmarks/unet_gpu.py [--profiles small base] [--steps 20]

For each profile, the profile's own U-Net (its widths, its latent size: `small` 64 px
images with f=4 latents, 16x16x4; `base` 256 px with f=8, 32x32x4; text states of the
profile's CLIP width and length) at the profile's batch size, one training step timed
in these variants, each after warm-up steps and with the GPU synchronised around the
timed block:

- ``Trainer.fit`` — Kiln's real loop (bf16 autocast, NaN guard, clipping, AdamW, EMA),
  the step built by ``training.phases.unet.make_step_fn`` from latents held in host memory.
  Checkpoints are switched off (a no-op ``Checkpointer``): they are not steps.
- the same loop made to wait for the GPU twice a step, as it did before the NaN guard
  was deferred to log steps and batches moved through pinned memory (the A/B of that
  change).
- the same with ``channels_last`` weights, with fused AdamW, with ``torch.compile``.
- a plain diffusers-style loop (``train_text_to_image.py`` reimplemented minimally:
  the batch and all random draws on the GPU, bf16 autocast, no per-step host sync),
  and the same loop in fp32, so bf16's gain is visible.

Reports images/s (median over rounds) and peak allocated GPU memory per variant.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import config  # noqa: E402
from training import engine as E  # noqa: E402
from training.phases import clip, unet, vae  # noqa: E402

N = 2048  # latents held in host memory, as precompute_latents leaves them


class NoCheckpoints:
    extra: dict = {}  # Trainer.fit reads the last checkpoint's metrics (none here)

    def restore(self, *a, **k) -> int:
        return 0

    def save(self, *a, **k) -> None:
        pass


def shapes(profile: str) -> tuple[config.Params, int, int, int, int]:
    params = config.resolve({"profile": profile})
    with torch.device("meta"):
        ae = vae.build(params)
    size = params.ingest.image_size // 2 ** (len(params.train_vae.block_out_channels) - 1)
    ch = ae.config.latent_channels
    context = clip.context_bound(params.train_clip)  # the longest the data may ask for
    text_dim = clip.build(params, 1000, context).text_model.config.hidden_size
    return params, ch, size, text_dim, context


def kiln_variant(
    params,
    ch,
    size,
    text_dim,
    length,
    dev,
    *,
    channels_last=False,
    fused=False,
    compiled=False,
    wait=False,
):
    c = params.train_unet
    model = unet.build(params, ch, size, text_dim).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=0.01, fused=fused or None)
    net = torch.compile(model) if compiled else model
    mean = torch.randn(N, ch, size, size)
    std = torch.full_like(mean, 0.05)
    text = torch.randn(N, length, text_dim)
    step_fn = unet.make_step_fn(
        params,
        net,
        unet.noise_scheduler(params),
        lambda step: (lambda i: (mean[i], std[i], text[i]))(
            E.batch_indices(N, c.batch_size, step, params.seed)
        ),
        text[:1],
        1.0,
        dev,
    )
    ema = E.EMA(model, c.ema_decay)
    done = {"n": 0}

    def waiting(step: int):
        # The loop as it was: the step's pageable host-to-GPU copies waited for the queue
        # to drain, and the NaN guard read the loss at once.
        torch.cuda.synchronize()
        loss, metrics = step_fn(step)
        bool(torch.isfinite(loss))
        return loss, metrics

    def run(steps: int) -> float:
        loop = E.LoopCfg(
            steps=steps,
            lr=c.lr,
            warmup_steps=c.warmup_steps,
            grad_clip=c.grad_clip,
            batch_size=c.batch_size,
            checkpoint_every=10**9,
            log_every=10**9,
        )
        trainer = E.Trainer("bench", model, opt, loop, NoCheckpoints(), ema=ema, device=dev)
        start = done["n"]  # NoCheckpoints restores to step 0: carry on the step count
        done["n"] += steps
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.fit(lambda step: waiting(start + step) if wait else step_fn(start + step))
        torch.cuda.synchronize()
        model.train()
        return (time.perf_counter() - t0) / steps

    return run


def diffusers_variant(params, ch, size, text_dim, length, dev, *, bf16=True):
    c = params.train_unet
    model = unet.build(params, ch, size, text_dim).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=0.01)
    sched = unet.noise_scheduler(params)
    abar = sched.alphas_cumprod.to(dev)
    mean = torch.randn(N, ch, size, size, device=dev)
    text = torch.randn(N, length, text_dim, device=dev)

    def run(steps: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(0, N, (c.batch_size,), device=dev)
            z0 = mean[idx] + 0.05 * torch.randn_like(mean[idx])
            noise = torch.randn_like(z0)
            t = torch.randint(0, c.num_train_timesteps, (len(idx),), device=dev)
            a = abar[t].view(-1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
            target = a.sqrt() * noise - (1 - a).sqrt() * z0  # v-prediction
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                pred = model(zt, t, encoder_hidden_states=text[idx]).sample
            loss = F.mse_loss(pred.float(), target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profiles", nargs="+", default=["small", "base"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--only", nargs="*", help="run only variants whose name contains one of these")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("unet_gpu.py needs a CUDA GPU")
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; "
        f"{args.rounds} rounds x {args.steps} steps after 1 warm-up round (medians)\n"
    )
    print("| profile | variant | images/s | vs Trainer.fit | peak GPU memory |")
    print("|---|---|---:|---:|---:|")
    for profile in args.profiles:
        params, ch, size, text_dim, length = shapes(profile)
        batch = params.train_unet.batch_size
        shape = (ch, size, text_dim, length)
        variants = [
            ("Kiln Trainer.fit (bf16 autocast)", kiln_variant, {}),
            ("Trainer.fit waiting on the GPU every step (before)", kiln_variant, {"wait": True}),
            ("+ channels_last", kiln_variant, {"channels_last": True}),
            ("+ fused AdamW", kiln_variant, {"fused": True}),
            ("+ torch.compile", kiln_variant, {"compiled": True}),
            ("diffusers-style loop, bf16", diffusers_variant, {}),
            ("diffusers-style loop, fp32", diffusers_variant, {"bf16": False}),
        ]
        base = None
        with torch.device("meta"):  # parameter count only: no weights allocated
            n = sum(p.numel() for p in unet.build(params, ch, size, text_dim).parameters())
        for name, make, kwargs in variants:
            if args.no_compile and kwargs.get("compiled"):
                continue
            if args.only and not any(k in name for k in args.only):
                continue
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                run = make(params, *shape, dev, **kwargs)
                run(max(3, args.steps // 2))  # warm-up (and compilation)
                times = [run(args.steps) for _ in range(args.rounds)]
            except torch.OutOfMemoryError:
                print(f"| {profile} | {name} | out of memory | | |", flush=True)
                continue
            except Exception as e:  # e.g. an Inductor bug in this torch: say so, go on
                print(f"| {profile} | {name} | failed: {type(e).__name__} | | |", flush=True)
                continue
            ips = batch / statistics.median(times)
            base = base or ips
            peak = torch.cuda.max_memory_allocated() / 2**30
            label = f"{profile} (U-Net {n / 1e6:.0f} M, batch {batch}, latents {ch}x{size}x{size})"
            print(
                f"| {label} | {name} | {ips:.0f} | {ips / base:.2f}x | {peak:.1f} GiB |", flush=True
            )
            del run


if __name__ == "__main__":
    main()
