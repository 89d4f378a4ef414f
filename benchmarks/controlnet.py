"""ControlNet at tiny (issue #18): control- and text-following against the base model,
by ControlNet steps and learning rate.

Usage (from the repository root, alone on the machine):
    .venv/bin/python benchmarks/controlnet.py [--unet-steps N] [--steps 400 800]
        [--lr 0.001 0.003] [--seed 0] [--project DIR] [--hand-drawn PNG]

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


def hand_drawn_controls(
    out: Path, size: int, n: int = 12, seed: int = 1
) -> list[tuple[Path, str, str]]:
    """``n`` controls drawn with ``ImageDraw``, ``size`` px: a white square, circle or
    triangle of 0.28 or 0.56 of the side (small, large) at a random cell centre of the
    shapes set, kept a pixel inside the canvas; each with its prompt's colour."""
    import numpy as np
    from PIL import Image, ImageDraw

    from training.intake.builtin import CELL_CENTRES

    rng = np.random.default_rng(seed)
    cases = []
    for k in range(n):
        shape = ("square", "circle", "triangle")[k % 3]
        colour = ("red", "green", "blue", "yellow")[k % 4]
        side = round(float(rng.choice([0.28, 0.56])) * size)
        cy, cx = (
            min(max(CELL_CENTRES[int(rng.integers(3))] * size, side / 2 + 1), size - side / 2 - 1)
            for _ in range(2)
        )
        x0, y0 = round(cx - side / 2), round(cy - side / 2)
        x1, y1 = x0 + side - 1, y0 + side - 1
        img = Image.new("RGB", (size, size))
        draw = ImageDraw.Draw(img)
        if shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill="white")
        elif shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill="white")
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill="white")
        path = out / f"control-{k:02d}.png"
        img.save(path)
        cases.append((path, shape, colour))
    return cases


def hand_drawn(project: Path, grid_png: Path, seeds: int = 4) -> dict[str, float]:
    """Control- and text-following of ``kiln generate --control`` on hand-drawn controls,
    graded as the stage grades its val controls (``evaluation.control.grade``)."""
    from PIL import Image

    from training.engine.images import grid
    from training.evaluation.control import grade
    from training.evaluation.oracle import ShapesOracle

    oracle = ShapesOracle(0)
    size = config.load(project / "params.yaml").ingest.image_size
    truths, prompts, samples, tiles = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for path, shape, colour in hand_drawn_controls(Path(tmp), size):
            control = Image.open(path).convert("RGB")
            out = Path(tmp) / f"gen-{path.stem}"
            prompt = f"a {colour} {shape}"
            kiln(project, "generate", prompt, "--control", str(path),
                 "--controlnet", "data/models/controlnet", "--model", "data/eval/pipeline",
                 "-n", str(seeds), "--out", str(out))  # fmt: skip
            drawn = [Image.open(p).convert("RGB") for p in sorted(out.glob("*.png"))]
            truths += [oracle.read(control)] * len(drawn)
            prompts += [prompt] * len(drawn)
            samples += drawn
            tiles += [control, *drawn]
    grid(tiles, nrow=2 * (seeds + 1), scale=2).save(grid_png)
    return grade(oracle, truths, prompts, samples) | {"samples": len(samples)}


def base_line(ev: dict) -> str:
    """The base model's oracle accuracies from its evaluate.json. A held-out figure
    evaluate could not measure (no held-out prompt among its samples) is there only as
    ``acc_all_held_out_skipped``, its reason: shown as such rather than a KeyError
    before the ControlNet rows."""
    held = ev.get("acc_all_held_out")
    held_out = f"{held:.3f}" if held is not None else "— (" + ev["acc_all_held_out_skipped"] + ")"
    seen = f"acc_all {ev['acc_all']:.3f}, seen {ev['acc_all_seen']:.3f}"
    return f"base model: {seen}, held-out {held_out}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--unet-steps", type=int, default=None, help="default: the profile's")
    ap.add_argument("--steps", type=int, nargs="*", default=[400, 800], help="none: no training")
    ap.add_argument("--lr", type=float, nargs="+", default=[0.001, 0.003])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--project", type=Path, default=None)
    ap.add_argument("--hand-drawn", type=Path, default=None, metavar="PNG")
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
        print(base_line(ev), flush=True)
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
        if args.hand_drawn:
            hand = hand_drawn(project, args.hand_drawn)
            print("hand-drawn controls:", json.dumps({k: round(v, 3) for k, v in hand.items()}))
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
