"""Condition-annealed sampling (CADS, Sadat et al., ICLR 2024) on a trained project:
does noising the text condition in the noisiest steps widen the samples' spread, and
bring them closer to the real pictures, at the guidance evaluate serves?

Usage (from the repository root, alone on the machine, on a project that ran ``kiln run``
on data without an oracle):
    .venv/bin/python benchmarks/cads.py PROJECT --seeds 0,1,2,3 [--guidance 1.5,2]
        [--cads 0.6:0.9:0.25,...] [--pool 512]

The pooled FD ratio of "the pooled ratio over caption picks" (RESULTS.md) was the
covariance's, not the mean's: lower guidance came closer every time, and twice the U-Net
steps moved CMMD but not FD, i.e. the samples' spread is narrower than the pictures'.
CADS keeps the guidance and perturbs the condition instead: at denoising time t (1 is
pure noise) the conditional branch reads ``sqrt(g) y + s sqrt(1 - g) n``, g = 1 below
``tau1``, 0 above ``tau2``, linear between, n fresh Gaussian noise each step, then
rescaled to y's own mean and standard deviation (psi = 1); the unconditional branch is
untouched. Each ``--cads`` entry is ``tau1:tau2:s``; ``off`` is the pipeline as served.

The measure is evaluate's own choice protocol (``evaluation/guidance.choose``) at each
``--seeds`` value: ``--pool`` training captions, one sample each, against 1,024 other
training images, the captions' own images as the floor, in the project's own CLIP; every
CADS setting on the same picks and sampling seeds, so rows compare paired. One JSON line
per (seed, setting): the FD ratio and CLIP score per guidance. Results: RESULTS.md, "CADS".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def with_cads(pipe, tau1: float, tau2: float, s: float, seed: int = 0):
    """``pipe`` whose U-Net reads the conditional half of each batched CFG call through
    CADS' annealed noise; an unguided call (one branch) has its whole batch annealed."""
    import torch

    unet = pipe.unet
    own = unet.forward
    total = pipe.scheduler.config.num_train_timesteps
    gen = torch.Generator().manual_seed(seed)

    def gamma(t: float) -> float:
        if t <= tau1:
            return 1.0
        if t >= tau2:
            return 0.0
        return (tau2 - t) / (tau2 - tau1)

    def anneal(y: torch.Tensor, g: float) -> torch.Tensor:
        if g >= 1.0:
            return y
        n = torch.randn(y.shape, generator=gen).to(y)
        noisy = g**0.5 * y + s * (1 - g) ** 0.5 * n
        dims = tuple(range(1, y.ndim))
        mu, sd = y.mean(dims, keepdim=True), y.std(dims, keepdim=True)
        nmu, nsd = noisy.mean(dims, keepdim=True), noisy.std(dims, keepdim=True)
        return (noisy - nmu) / nsd * sd + mu

    def forward(sample, timestep, encoder_hidden_states, *args, **kwargs):
        t = float(timestep.flatten()[0] if torch.is_tensor(timestep) else timestep) / total
        g = gamma(t)
        states = encoder_hidden_states
        b = sample.shape[0]
        if g < 1.0:
            if b % 2 == 0 and states.shape[0] == b and b >= 2:  # [uncond; cond]
                n = b // 2
                states = torch.cat([states[:n], anneal(states[n:], g)])
            else:
                states = anneal(states, g)
        return own(sample, timestep, states, *args, **kwargs)

    unet.forward = forward
    return lambda: setattr(unet, "forward", own)


def main() -> None:
    from training import config
    from training.evaluation import guidance as G
    from training.inference import sampling

    ap = argparse.ArgumentParser()
    ap.add_argument("project", type=Path)
    ap.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0])
    ap.add_argument("--guidance", type=lambda v: [float(g) for g in v.split(",")],
                    default=[1.5])  # fmt: skip
    ap.add_argument("--cads", default="off,0.6:0.9:0.25", help="off or tau1:tau2:s, ...")
    ap.add_argument("--pool", type=int, default=512)
    args = ap.parse_args()
    settings = []
    for item in args.cads.split(","):
        if item == "off":
            settings.append(None)
        else:
            tau1, tau2, s = (float(x) for x in item.split(":"))
            if not 0 <= tau1 < tau2 <= 1 or s < 0:
                ap.error(f"--cads {item}: want 0 <= tau1 < tau2 <= 1 and s >= 0")
            settings.append((tau1, tau2, s))

    params = config.load(args.project / "params.yaml")
    pipe = sampling.load(args.project / "data/eval/pipeline")
    clip = args.project / "data/models/clip"
    candidates = [(g, 0.0) for g in args.guidance]
    for seed in args.seeds:
        for setting in settings:
            undo = with_cads(pipe, *setting, seed=seed) if setting else (lambda: None)
            t0 = time.perf_counter()
            try:
                got = G.choose(pipe, candidates, args.project / "data/clean", clip, clip,
                               params.ingest.image_size, params.evaluate.steps, "", seed,
                               params.evaluate.batch_size, args.pool)  # fmt: skip
            finally:
                undo()
            if "skipped" in got:
                sys.exit(f"seed {seed}: {got['skipped']}")
            row = {"seed": seed, "cads": ":".join(f"{x:g}" for x in setting) if setting else "off",
                   "floor": round(got["floor"], 4)}  # fmt: skip
            for r in got["table"]:
                row[f"{r['guidance']:g}"] = round(r["fd_ratio"], 3)
                row[f"clip_{r['guidance']:g}"] = round(r["clip_score"], 3)
            row["s"] = round(time.perf_counter() - t0)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
