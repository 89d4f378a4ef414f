"""What a U-Net training step costs on 16x16 latents, by where it attends to the text:
the evidence for tiny64's four-level U-Net without attention at its first level.

Usage (from the repository root, alone on the machine; about 2 minutes on 2 cores):
    .venv/bin/python benchmarks/unet_levels.py [--rounds 3] [--steps 5]

Each variant is built by ``training/backbones/unet2d.build`` from a profile plus
overrides, with the profile's batch (64) and random latents and text states (speed does
not depend on the weights), and times forward, backward and an AdamW step. The variants
alternate in rounds so drift in the machine's speed hits all of them; the table gives
each one's median against tiny's own step on its 8x8 latents.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import config  # noqa: E402
from training.backbones import TextDims, unet2d  # noqa: E402

TINY64 = {"profile": "tiny64"}
VARIANTS = {  # name: (params, latent side)
    "tiny: [32, 64, 64] at 8x8": ({"profile": "tiny"}, 8),
    "tiny's U-Net at 16x16": ({"profile": "tiny"}, 16),
    "tiny64: [16, 32, 64, 64], no attention at 16x16": (TINY64, 16),
    "the same, attention at 16x16": ({**TINY64, "train_unet": {"plain_levels": 0}}, 16),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    runs = {}
    for name, (raw, side) in VARIANTS.items():
        params = config.resolve(raw)
        clip = params.train_clip  # the profile's text width; its longest context (Twemoji's)
        model = unet2d.build(params, 4, side, TextDims(clip.hidden_size, clip.projection_dim))
        batch = params.train_unet.batch_size
        text = torch.randn(batch, clip.max_length_cap, clip.hidden_size)
        data = (torch.randn(batch, 4, side, side), text)
        runs[name] = (model, torch.optim.AdamW(model.parameters(), 1e-3), data)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, (model, opt, (x, text)) in runs.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                t = torch.randint(0, 1000, (len(x),))
                loss = model(x, t, encoder_hidden_states=text).sample.pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            if r:
                times[name].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(next(iter(times.values())))
    print("| U-Net | parameters | s / step (batch 64) | against tiny |\n|---|---:|---:|---:|")
    for name, (model, _, _) in runs.items():
        med = statistics.median(times[name])
        n = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"| {name} | {n:.2f} M | {med:.3f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
