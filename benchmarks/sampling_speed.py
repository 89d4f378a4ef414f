"""Sampling speed per scheduler and step count, and how few DPM-Solver++ steps match
DDPM with 1000 steps.

Usage (after `make run`, from the project root; ~8 minutes on 2 cores):
    .venv/bin/python benchmarks/sampling_speed.py [--pipeline data/eval/pipeline] [--n 96]

Uses the evaluated pipeline (what `kiln generate` loads) and the built-in shapes
oracle. For each scheduler and step count it generates the same N prompts x seeds
(guidance 4, batch 64, as `kiln generate` batches) and reports images/s and the
oracle's all-attributes accuracy with its standard error. Then DDPM at 1000 steps on
the same prompts and seeds, and the fewest DPM-Solver++ steps whose accuracy is within
2 points of it: the ratio of U-Net calls is the figure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipeline", default="data/eval/pipeline")
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--guidance", type=float, default=4.0)
    args = ap.parse_args()

    from training.evaluation import oracle as O
    from training.inference import sampling
    from training.intake import builtin

    pipe = sampling.load(args.pipeline)
    prompts = builtin.eval_prompts("shapes")
    stride = max(1, len(prompts) // args.n)
    prompts = prompts[::stride][: args.n]
    oracle = O.for_dataset("shapes")

    def run(scheduler: str, steps: int) -> tuple[float, float, float]:
        sampling.set_scheduler(pipe, scheduler)
        reqs = [
            sampling.Request(p.prompt, seed=10_000 + i, steps=steps, guidance=args.guidance)
            for i, p in enumerate(prompts)
        ]
        t0 = time.perf_counter()
        images = sampling.generate(pipe, reqs, batch_size=64)
        rate = len(images) / (time.perf_counter() - t0)
        hits = [oracle.score(img, p.truth)["all"] for img, p in zip(images, prompts, strict=True)]
        acc = float(np.mean(hits))
        se = float(np.sqrt(acc * (1 - acc) / len(hits)))
        return rate, acc, se

    rows = []
    grid = {
        "ddpm": (20, 50),
        "ddim": (10, 20, 50),
        "euler": (10, 20, 50),
        "dpm++": (5, 8, 10, 15, 20, 30),
    }
    for name, step_list in grid.items():
        for steps in step_list:
            rate, acc, se = run(name, steps)
            rows.append((name, steps, rate, acc, se))
            print(f"{name} {steps}: {rate:.1f} img/s, acc_all {acc:.3f} ± {se:.3f}", flush=True)
    rate, ref, ref_se = run("ddpm", 1000)
    rows.append(("ddpm", 1000, rate, ref, ref_se))
    print(f"ddpm 1000: {rate:.2f} img/s, acc_all {ref:.3f} ± {ref_se:.3f}", flush=True)

    print(f"\n{len(prompts)} shapes prompts x 1 seed, guidance {args.guidance:g}, batch 64\n")
    print("| scheduler | steps | images/s | acc_all (± s.e.) |")
    print("|---|---:|---:|---:|")
    for name, steps, rate, acc, se in rows:
        print(f"| {name} | {steps} | {rate:.2f} | {acc:.3f} ± {se:.3f} |")
    match = [r for r in rows if r[0] == "dpm++" and r[3] >= ref - 0.02]
    if match:
        best = min(match, key=lambda r: r[1])
        print(
            f"\nFewest DPM-Solver++ steps within 2 points of DDPM-1000 ({ref:.3f}): "
            f"{best[1]} ({best[3]:.3f}); {1000 / best[1]:.0f}x fewer U-Net calls"
        )
    else:
        print(f"\nNo DPM-Solver++ step count tried came within 2 points of DDPM-1000 ({ref:.3f})")


if __name__ == "__main__":
    main()
