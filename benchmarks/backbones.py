"""The DiT against the U-Net at the same wall-clock budget (issue #17), tiny shapes.

Usage (from the repository root, alone on the machine; about 20 minutes per seed):
    .venv/bin/python benchmarks/backbones.py [--seeds 0 1 2] [--dit-lr 0.003]
        [--check-dit-lr 0.001] [--unet-steps 1800] [--calibrate 100]
        [--only dit --dit-steps 983]   (more seeds of one backbone, no calibration)

One project runs the pipeline up to the latents once (tiny's full VAE and CLIP budget).
Then a calibration trains each denoiser ``--calibrate`` steps to measure its training
steps/s on this machine, and the DiT gets the steps that take the U-Net's
``--unet-steps`` time: the same wall-clock budget, measured in this invocation. Per
seed each backbone runs ``kiln precompute-latents`` (its own text states), ``kiln
train-unet`` and ``kiln evaluate`` (the 144 shapes prompts x 2 seeds, oracle graded);
the two alternate, so drift in the machine's speed hits both. ``--check-dit-lr`` adds one
DiT run per rate at the first seed: the evidence for the DiT's default rate (the
U-Net's ``train_unet.lr``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import copy_project, kiln  # noqa: E402
from training import config  # noqa: E402

SETUP = {"train_unet.steps": 1, "evaluate.max_prompts": 1, "evaluate.sweep_prompts": 0}


def _metrics(project: Path, stage: str) -> dict:
    return json.loads((project / "data" / "metrics" / f"{stage}.json").read_text())


def train(project: Path, backbone: str, steps: int, seed: int, lr: float | None) -> dict:
    """precompute_latents (when the backbone changed), train_unet, evaluate."""
    settings = {
        "seed": seed, "train_unet.backbone": backbone, "train_unet.steps": steps,
        "evaluate.max_prompts": None,
    }  # fmt: skip
    if lr is not None:
        settings["train_unet.lr"] = lr
    config.set_values(project / "params.yaml", settings)
    manifest = json.loads((project / "data/latents/manifest.json").read_text())
    if manifest.get("backbone", "unet2d") != backbone:
        kiln(project, "precompute-latents", timeout=3600)
    kiln(project, "train-unet", timeout=4 * 3600)
    out = _metrics(project, "train_unet")
    return out


def held_out(ev: dict) -> float:
    """The held-out accuracy, NaN when evaluate drew no held-out prompt (it records the
    reason as ``acc_all_held_out_skipped`` instead)."""
    return ev.get("acc_all_held_out", float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--dit-lr", type=float, default=None, help="default: params.yaml's")
    ap.add_argument("--check-dit-lr", type=float, nargs="*", default=[0.001])
    ap.add_argument("--unet-steps", type=int, default=1800)
    ap.add_argument("--calibrate", type=int, default=100)
    ap.add_argument("--only", choices=["unet2d", "dit"], help="train one backbone only")
    ap.add_argument("--dit-steps", type=int, help="skip the calibration: the DiT's steps")
    args = ap.parse_args()
    lrs = {"unet2d": None, "dit": args.dit_lr}  # None: params.yaml's (train_unet.lr)
    with tempfile.TemporaryDirectory() as tmp:
        project = copy_project(Path(tmp) / "kiln")
        config.set_values(project / "params.yaml", SETUP)
        kiln(project, "run", "--dataset", "shapes", "--profile", "tiny", timeout=4 * 3600)
        config.set_values(project / "params.yaml", {"evaluate.sweep_prompts": 0})
        if args.dit_steps:
            steps = {"unet2d": args.unet_steps, "dit": args.dit_steps}
        else:
            rate = {}
            for b in ("unet2d", "dit"):
                rate[b] = train(project, b, args.calibrate, 0, lrs[b])["samples_per_s"]
            steps = {
                "unet2d": args.unet_steps,
                "dit": round(args.unet_steps * rate["dit"] / rate["unet2d"]),
            }
            print(f"calibration samples/s: {rate}; steps at the U-Net's budget: {steps}")
        rows = []
        for seed in args.seeds:
            for b in ("unet2d", "dit") if seed % 2 == 0 else ("dit", "unet2d"):
                if args.only and b != args.only:
                    continue
                m = train(project, b, steps[b], seed, lrs[b])
                kiln(project, "evaluate", timeout=3600)
                ev = _metrics(project, "evaluate")
                row = {
                    "seed": seed, "backbone": b, "steps": steps[b], "params": m["params"],
                    "train_s": m["train_seconds"], "val_loss": m.get("val_loss"),
                    "seen": ev["acc_all_seen"], "held_out": held_out(ev), "acc_all": ev["acc_all"],
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
        for lr in args.check_dit_lr:
            m = train(project, "dit", steps["dit"], args.seeds[0], lr)
            kiln(project, "evaluate", timeout=3600)
            ev = _metrics(project, "evaluate")
            print(json.dumps({
                "check_dit_lr": lr, "seed": args.seeds[0], "steps": steps["dit"],
                "seen": ev["acc_all_seen"], "held_out": held_out(ev), "acc_all": ev["acc_all"],
                "val_loss": m.get("val_loss"),
            }), flush=True)  # fmt: skip
    print("| backbone | params | steps | train s | acc_all | seen | held-out | val loss |")
    print("|---|---:|---:|---:|---|---|---|---:|")
    for b in ("unet2d", "dit"):
        rs = [r for r in rows if r["backbone"] == b]
        if not rs:
            continue

        def spread(key: str, rs: list = rs) -> str:
            vals = [r[key] for r in rs]
            return f"{statistics.mean(vals):.3f} ({', '.join(f'{v:.3f}' for v in vals)})"

        print(
            f"| {b} | {rs[0]['params'] / 1e6:.2f} M | {rs[0]['steps']} | "
            f"{statistics.mean(r['train_s'] for r in rs):.0f} | {spread('acc_all')} | "
            f"{spread('seen')} | {spread('held_out')} | "
            f"{statistics.mean(r['val_loss'] for r in rs):.4f} |"
        )
    print("(val loss: each objective's own held-out loss; not comparable across backbones)")


if __name__ == "__main__":
    main()
