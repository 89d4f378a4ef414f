"""U-Net training step: precomputed latents vs encoding inside the step, and Kiln's step
vs a plain diffusers-style loop.

Usage (from the repository root; ~6 minutes on 2 cores):
    .venv/bin/python benchmarks/unet_step.py [--rounds 3] [--steps 8]

Part A — what ``precompute_latents`` saves. For the tiny profile (32 px images) and the
small profile's image size (64 px), with the profile's own VAE, CLIP text encoder and
U-Net (randomly initialised: speed does not depend on the weights), one training step
with latents and text states read from memory (Kiln's way) vs the same step encoding
the batch with the VAE and the text encoder first (train_text_to_image.py's way).
Both use Kiln's real step function (``training.phases.unet.make_step_fn``) and the same
batch; the two variants alternate in rounds so machine noise hits both.

Part B — Kiln's loop vs a minimal reimplementation of the loop in diffusers'
``examples/text_to_image/train_text_to_image.py`` (noise, add_noise, v-target, min-SNR
weights, backward, clip, AdamW, LR scheduler, ``diffusers.training_utils.EMAModel``) on
the tiny U-Net and batch; plus Kiln's loop with the ``foreach`` and ``fused`` AdamW
implementations. Kiln's figure is ``Trainer.fit`` itself: progress bar, NaN guard,
EMA, per-step logging; each step is timed from one step's log call to the next (the
final checkpoint of each round is left out: it is not a step).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import config  # noqa: E402
from training import engine as E  # noqa: E402
from training.phases import clip, unet, vae  # noqa: E402

N = 512


def setup(profile: str, image_size: int, batch: int):
    params = config.resolve(
        {
            "profile": profile,
            "ingest": {"image_size": image_size},
            "train_unet": {"batch_size": batch},
        }
    )
    torch.manual_seed(0)
    ae = vae.build(params).eval()
    context = clip.context_bound(params.train_clip)  # the longest the data may ask for
    text_model = clip.build(params, 600, context).text_model.eval()
    images = torch.rand(N, 3, image_size, image_size) * 2 - 1
    ids = torch.randint(2, 600, (N, context))
    with torch.no_grad():
        post = torch.cat([ae.encode(b).latent_dist.mean for b in images.split(64)]), None
        mean = post[0]
        std = torch.full_like(mean, 0.05)
        text = torch.cat([text_model(b).last_hidden_state for b in ids.split(128)])
    ch, size = mean.shape[1], mean.shape[-1]
    model = unet.build(params, ch, size, text.shape[-1])
    return params, ae, text_model, images, ids, mean, std, text, model


def part_a(rounds: int, steps: int) -> list[str]:
    rows = []
    for profile, size, batch in (("tiny", 32, 64), ("small", 64, 16)):
        params, ae, text_model, images, ids, mean, std, text, model = setup(profile, size, batch)
        sched = unet.noise_scheduler(params)
        null = text[:1]
        dev = torch.device("cpu")

        def idx_of(step, bs=params.train_unet.batch_size, seed=params.seed):
            return E.batch_indices(N, bs, step, seed)

        def precomputed(step, mean=mean, std=std, text=text):
            idx = idx_of(step)
            return mean[idx], std[idx], text[idx]

        def encoded(step, ae=ae, text_model=text_model, images=images, ids=ids):
            idx = idx_of(step)
            with torch.no_grad():
                post = ae.encode(images[idx]).latent_dist
                states = text_model(ids[idx]).last_hidden_state
            return post.mean, post.std, states

        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        fns = {
            "precomputed": unet.make_step_fn(params, model, sched, precomputed, null, 1.0, dev),
            "encode in step": unet.make_step_fn(params, model, sched, encoded, null, 1.0, dev),
        }
        times: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(rounds + 1):  # round 0 warms up
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for s in range(steps):
                    loss, _ = fn(r * steps + s)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                if r:
                    times[name].append((time.perf_counter() - t0) / steps)
        pre, enc = (statistics.median(times[k]) for k in fns)
        n_unet = sum(p.numel() for p in model.parameters()) / 1e6
        rows.append(
            f"| {profile} ({size} px, batch {batch}, U-Net {n_unet:.1f} M) | "
            f"{1 / pre:.2f} | {1 / enc:.2f} | {enc / pre:.2f}x |"
        )
    return rows


def part_b(rounds: int, steps: int) -> list[str]:
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, compute_snr

    params, _, _, _, _, mean, std, text, _ = setup("tiny", 32, 64)
    c = params.train_unet
    sched = unet.noise_scheduler(params)
    null = text[:1]
    ch, size = mean.shape[1], mean.shape[-1]
    variants: dict[str, object] = {}

    def kiln_variant(opt_kwargs: dict):
        model = unet.build(params, ch, size, text.shape[-1])
        opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=0.01, **opt_kwargs)
        ckpt = Path(tempfile.mkdtemp())
        state = {"done": 0}

        def precomputed(step):
            idx = E.batch_indices(N, params.train_unet.batch_size, step, params.seed)
            return mean[idx], std[idx], text[idx]

        step_fn = unet.make_step_fn(params, model, sched, precomputed, null, 1.0, E.device())

        class Clock:  # logs every step: the gaps are the loop's own step times
            def __init__(self):
                self.stamps: list[float] = []

            def log_metrics(self, metrics, step=None):
                self.stamps.append(time.perf_counter())

            def log_image(self, path, artifact_dir="images"):
                pass

        ema = E.EMA(model, c.ema_decay)

        def run(n: int) -> list[float]:
            state["done"] += n
            loop = E.LoopCfg(
                steps=state["done"],
                lr=c.lr,
                warmup_steps=c.warmup_steps,
                grad_clip=c.grad_clip,
                batch_size=c.batch_size,
                checkpoint_every=10**9,
                log_every=1,
            )
            clock = Clock()
            trainer = E.Trainer(
                "bench", model, opt, loop, E.Checkpointer(ckpt, "bench"), log=clock, ema=ema
            )
            trainer.fit(step_fn)  # resumes from the previous round's checkpoint
            model.train()
            # the round's final checkpoint comes after its last log call: in no gap
            return list(np.diff(clock.stamps))

        return run

    def diffusers_variant():
        model = unet.build(params, ch, size, text.shape[-1])
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=0.01)
        lr_sched = get_scheduler(
            "cosine", opt, num_warmup_steps=c.warmup_steps, num_training_steps=10_000
        )
        ema = EMAModel(model.parameters(), decay=c.ema_decay)
        g = torch.Generator().manual_seed(0)

        def run(n: int) -> list[float]:
            gaps = []
            for _ in range(n):
                t0 = time.perf_counter()
                idx = torch.randint(0, N, (c.batch_size,), generator=g)
                latents = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
                noise = torch.randn_like(latents)
                t = torch.randint(0, c.num_train_timesteps, (len(idx),), generator=g)
                noisy = sched.add_noise(latents, noise, t)
                target = sched.get_velocity(latents, noise, t)
                pred = model(noisy, t, text[idx], return_dict=False)[0]
                snr = compute_snr(sched, t)
                w = torch.stack([snr, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0] / (snr + 1)
                loss = F.mse_loss(pred.float(), target.float(), reduction="none")
                loss = (loss.mean(dim=list(range(1, loss.ndim))) * w).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
                opt.step()
                lr_sched.step()
                opt.zero_grad()
                ema.step(model.parameters())
                gaps.append(time.perf_counter() - t0)
            return gaps

        return run

    variants["diffusers-style loop (AdamW default)"] = diffusers_variant()
    variants["kiln Trainer.fit (AdamW default)"] = kiln_variant({})
    variants["kiln Trainer.fit (AdamW foreach)"] = kiln_variant({"foreach": True})
    variants["kiln Trainer.fit (AdamW fused)"] = kiln_variant({"fused": True})
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds + 1):
        for name, run in variants.items():
            gaps = run(steps)
            if r:
                times[name].extend(gaps)
    base = statistics.median(times["diffusers-style loop (AdamW default)"])
    rows = []
    for name in variants:
        m = statistics.median(times[name])
        rows.append(f"| {name} | {1000 * m:.0f} | {base / m:.2f}x |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.rounds} rounds x {args.steps} steps (medians)\n"
    )
    print("| profile | precomputed steps/s | encode-in-step steps/s | saving |")
    print("|---|---:|---:|---:|")
    for row in part_a(args.rounds, args.steps):
        print(row, flush=True)
    print("\n| tiny U-Net, batch 64 | ms/step | speed vs diffusers-style loop |")
    print("|---|---:|---:|")
    for row in part_b(args.rounds, args.steps * 2):
        print(row, flush=True)


if __name__ == "__main__":
    main()
