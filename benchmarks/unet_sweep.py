"""U-Net budget sweep: what the same latents buy under different U-Net settings.

Trains ``train_unet`` with each named override set on the latents of a finished run
(``PROJECT/data/latents``, with its VAE and CLIP), then runs the evaluation stage's
scoring (oracle, CLIP score) with one sample per prompt. Prints one markdown row per
variant and appends the full result to ``PROJECT/unet_sweep.jsonl``.

Usage (after `make run`, or on the project copy an e2e test made):
    .venv/bin/python benchmarks/unet_sweep.py PROJECT [--width N] [--samples K] \
        NAME='{"steps": 1800}' [NAME=...]

A variant's overrides are ``train_unet`` keys, plus ``seed`` (the run's top-level seed:
U-Net initialisation, batch order and noise), so the same setting can be tried over
several seeds. Variants run one after the other with all threads, or ``--width N`` at a
time with the CPU threads shared out (``--parallel`` = ``--width 2``: on a 2-core
machine, two one-thread runs get more done than one two-thread run of this small
model; on a GPU machine, several runs share the GPU). samples/s is only comparable
between variants run the same way. ``--samples K`` sets the evaluation's samples per
prompt (default 1; 2 is the pipeline's and halves the held-out score's noise).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

KEYS = ("acc_all_seen", "acc_all_held_out", "acc_shape", "acc_colour", "acc_size", "acc_position")


def run_one(project: Path, name: str, overrides: dict, samples: int) -> dict:
    """Train and evaluate one variant in this process; returns its result row."""
    import yaml

    from training import config, engine
    from training.evaluation import evaluate
    from training.phases import unet

    raw = yaml.safe_load((project / "params.yaml").read_text())
    overrides = dict(overrides)
    if "seed" in overrides:
        raw["seed"] = overrides.pop("seed")
    raw["train_unet"] = {**(raw.get("train_unet") or {}), **overrides}
    raw["evaluate"] = {**(raw.get("evaluate") or {}), "samples_per_prompt": samples}
    params = config.resolve(raw, source=f"{name} overrides")
    data, out = project / "data", project / "unet_sweep" / name
    t0 = time.perf_counter()
    m = unet.run(
        params, data / "latents", data / "models" / "vae", out / "unet", out / "checkpoints"
    )
    train_s = time.perf_counter() - t0
    e = evaluate.run(
        params,
        data / "clean",
        data / "models" / "vae",
        data / "models" / "clip",
        out / "unet",
        out / "eval",
    )
    return {
        "name": name,
        "overrides": overrides,
        "seed": params.seed,
        "device": str(engine.device()),
        "unet_params": m["params"],
        "steps": params.train_unet.steps,
        "batch_size": params.train_unet.batch_size,
        "train_s": round(train_s),
        "samples_per_s": round(m["samples_per_s"]),
        "final_loss": round(m["final_loss"], 4),
        **scores(e),
    }


def scores(metrics: dict) -> dict:
    """The evaluation's accuracies and CLIP score for a row, numbers rounded. An
    accuracy evaluate could not measure (no held-out prompt among the samples) comes as
    ``acc_..._skipped`` with its reason, a string: kept as it is, so the row says why
    the figure is missing instead of the variant failing after its training."""
    keep = {k: v for k, v in metrics.items() if k.startswith("acc_") or k == "clip_score"}
    return {k: v if isinstance(v, str) else round(v, 3) for k, v in keep.items()}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(usage=__doc__)
    ap.add_argument("project", type=Path)
    ap.add_argument("variants", nargs="+", help="NAME='{\"steps\": 1800}'")
    ap.add_argument("--width", type=int, default=1, help="variants run at once")
    ap.add_argument("--parallel", action="store_true", help="same as --width 2")
    ap.add_argument("--samples", type=int, default=1, help="evaluation samples per prompt")
    args = ap.parse_args(argv)
    if any("=" not in a for a in args.variants):
        sys.exit(__doc__)
    project = args.project.resolve()
    variants = [a.split("=", 1) for a in args.variants]
    if os.environ.get("KILN_SWEEP_CHILD"):  # one variant, in a child process
        name, spec = variants[0]
        row = run_one(project, name, json.loads(spec), args.samples)
        with open(project / "unet_sweep.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return
    width = 2 if args.parallel else max(1, args.width)
    env = {**os.environ, "KILN_SWEEP_CHILD": "1"}
    if width > 1:
        threads = str(max(1, (os.cpu_count() or 1) // width))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    for i in range(0, len(variants), width):
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, str(project), f"--samples={args.samples}", f"{n}={s}"],
                env=env,
            )
            for n, s in variants[i : i + width]
        ]
        if any(p.wait() for p in procs):
            sys.exit("a variant failed (see its output above)")
    rows = [json.loads(x) for x in (project / "unet_sweep.jsonl").read_text().splitlines()]
    names = {n for n, _ in variants}
    print(
        "| variant | seed | params | steps x batch | train s | samples/s | "
        + " | ".join(KEYS)
        + " |"
    )
    print("|---" * (6 + len(KEYS)) + "|")
    for r in rows:
        if r["name"] in names:
            shape = f"{r['steps']} x {r['batch_size']}"
            cells = " | ".join(f"{r.get(k, float('nan')):.3f}" for k in KEYS)
            print(
                f"| {r['name']} | {r.get('seed', '')} | {r['unet_params'] / 1e6:.2f} M | "
                f"{shape} | {r['train_s']} | "
                f"{r['samples_per_s']} | {cells} |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
