"""ControlNet at tiny (issue #18): control- and text-following against the base model,
by ControlNet steps and learning rate.

Usage (from the repository root, alone on the machine):
    .venv/bin/python benchmarks/controlnet.py [--unet-steps N] [--steps 400 800]
        [--lr 0.001 0.003] [--seed 0] [--project DIR]

One project runs the pipeline (tiny shapes, ``kiln run``: with no ``--unet-steps`` and
seed 0 exactly what ``make run`` runs, so its wall time and scores are printed as
``make run``'s), then ``kiln train-controlnet`` trains a ControlNet for each (steps,
rate) on that frozen base. ``--project``: a project (a copy of the repository) where
the pipeline already ran, kept afterwards. Each run's own evaluation (``evaluation/control.py``:
64 val images as controls, prompts ``a {other colour} {shape}``, oracle graded, with
and without the ControlNet) gives the row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import copy_project, kiln  # noqa: E402
from training import config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--unet-steps", type=int, default=None, help="default: the profile's")
    ap.add_argument("--steps", type=int, nargs="+", default=[400, 800])
    ap.add_argument("--lr", type=float, nargs="+", default=[0.001, 0.003])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--project", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    with contextlib.ExitStack() as stack:
        if args.project is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory())
            project = copy_project(Path(tmp) / "kiln")
            base = {"seed": args.seed}
            if args.unet_steps is not None:
                base["train_unet.steps"] = args.unet_steps
            config.set_values(project / "params.yaml", base)
            t0 = time.perf_counter()
            proc = kiln(project, "run", "--dataset", "shapes", "--profile", "tiny",
                        timeout=4 * 3600)  # fmt: skip
            print("\n".join(proc.stdout.splitlines()[-25:]))  # the run's summary
            print(f"kiln run: {time.perf_counter() - t0:.0f} s", flush=True)
        else:
            project = args.project
        ev = json.loads((project / "data/metrics/evaluate.json").read_text())
        print(
            f"base model: acc_all {ev['acc_all']:.3f}, seen {ev['acc_all_seen']:.3f},"
            f" held-out {ev['acc_all_held_out']:.3f}",
            flush=True,
        )
        for steps in args.steps:
            for lr in args.lr:
                settings = {"train_controlnet.enabled": True, "train_controlnet.steps": steps,
                            "train_controlnet.lr": lr}  # fmt: skip
                config.set_values(project / "params.yaml", settings)
                kiln(project, "train-controlnet", timeout=4 * 3600)
                m = json.loads((project / "data/metrics/train_controlnet.json").read_text())
                scores = {k: m[k] for k in m if k.startswith(("base_", "controlnet_"))}
                row = {"steps": steps, "lr": lr, "train_s": m["train_seconds"], **scores}
                rows.append(row)
                print(json.dumps(row), flush=True)
    arms = ("shape", "size", "position", "layout", "colour")
    print(
        "| steps | lr | train s | " + " | ".join(f"{a} (base -> ControlNet)" for a in arms) + " |"
    )
    print("|---:|---:|---:|" + "---|" * len(arms))
    for r in rows:
        cells = " | ".join(f"{r[f'base_{a}']:.2f} -> {r[f'controlnet_{a}']:.2f}" for a in arms)
        print(f"| {r['steps']} | {r['lr']} | {r['train_s']:.0f} | {cells} |")


if __name__ == "__main__":
    main()
