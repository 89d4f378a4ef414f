"""U-Net budget sweep: what the same latents buy under different U-Net settings.

Trains ``train_unet`` with each named override set on the latents of a finished run
(``PROJECT/data/latents``, with its VAE and CLIP), then runs the evaluation stage's
scoring (oracle, CLIP score) with one sample per prompt. Prints one markdown row per
variant and appends the full result to ``PROJECT/unet_sweep.jsonl``.

Usage (after `make run`, or on the project copy an e2e test made):
    .venv/bin/python benchmarks/unet_sweep.py PROJECT NAME='{"steps": 1800}' [NAME=...]

Variants run one after the other with all threads, or (``--parallel``) two at a time
with one thread each, which on a 2-core machine uses the cores better for this small
model; samples/s is only comparable between variants run the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

KEYS = ("acc_all_seen", "acc_all_held_out", "acc_shape", "acc_colour", "acc_size", "acc_position")


def run_one(project: Path, name: str, overrides: dict) -> dict:
    """Train and evaluate one variant in this process; returns its result row."""
    import yaml

    from training import config, evaluate, unet

    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["train_unet"] = {**(raw.get("train_unet") or {}), **overrides}
    raw["evaluate"] = {**(raw.get("evaluate") or {}), "samples_per_prompt": 1}
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
        "unet_params": m["params"],
        "steps": params.train_unet.steps,
        "batch_size": params.train_unet.batch_size,
        "train_s": round(train_s),
        "samples_per_s": round(m["samples_per_s"]),
        "final_loss": round(m["final_loss"], 4),
        **{k: round(e[k], 3) for k in e if k.startswith("acc_") or k == "clip_score"},
    }


def main(argv: list[str]) -> None:
    parallel = "--parallel" in argv
    args = [a for a in argv if a != "--parallel"]
    if len(args) < 2 or any("=" not in a for a in args[1:]):
        sys.exit(__doc__)
    project = Path(args[0]).resolve()
    variants = [a.split("=", 1) for a in args[1:]]
    if os.environ.get("KILN_SWEEP_CHILD"):  # one variant, in a child process
        name, spec = variants[0]
        row = run_one(project, name, json.loads(spec))
        with open(project / "unet_sweep.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return
    env = {**os.environ, "KILN_SWEEP_CHILD": "1"}
    if parallel:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    width = 2 if parallel else 1
    for i in range(0, len(variants), width):
        procs = [
            subprocess.Popen([sys.executable, __file__, str(project), f"{n}={s}"], env=env)
            for n, s in variants[i : i + width]
        ]
        if any(p.wait() for p in procs):
            sys.exit("a variant failed (see its output above)")
    rows = [json.loads(x) for x in (project / "unet_sweep.jsonl").read_text().splitlines()]
    names = {n for n, _ in variants}
    print("| variant | params | steps x batch | train s | samples/s | " + " | ".join(KEYS) + " |")
    print("|---" * (5 + len(KEYS)) + "|")
    for r in rows:
        if r["name"] in names:
            shape = f"{r['steps']} x {r['batch_size']}"
            cells = " | ".join(f"{r.get(k, float('nan')):.3f}" for k in KEYS)
            print(
                f"| {r['name']} | {r['unet_params'] / 1e6:.2f} M | {shape} | {r['train_s']} | "
                f"{r['samples_per_s']} | {cells} |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
