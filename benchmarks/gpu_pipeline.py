"""The training and evaluation stages on a CUDA GPU, from validated shards.

Usage (from the repository root, after ``kiln ingest && kiln validate`` made
``data/clean``; the GPU machine needs no MLflow, DVC or img2dataset for this):
    python benchmarks/gpu_pipeline.py [--clean data/clean] [--out /tmp/kiln-gpu]
        [--profile tiny] [--set train_unet.steps=1800 ...] [--until precompute_latents]

Runs the stages' own ``run`` functions — ``vae.run``, ``clip.run``, ``latents.run``,
``unet.run``, ``evaluate.run`` — in order on ``engine.device()`` (the GPU when there
is one: bf16 autocast for training, sampling on the GPU), with no tracking, and prints
per-stage wall time and the evaluation metrics as JSON. It checks that the GPU path
trains a model as good as the CPU one, not only that it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import config  # noqa: E402
from training import engine as E  # noqa: E402
from training.evaluation import evaluate  # noqa: E402
from training.phases import clip, latents, unet, vae  # noqa: E402


def parse_overrides(items: list[str]) -> dict:
    out: dict = {}
    for item in items:
        key, value = item.split("=", 1)
        section, field = key.split(".", 1)
        out.setdefault(section, {})[field] = json.loads(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clean", type=Path, default=ROOT / "data/clean")
    ap.add_argument("--out", type=Path, default=Path("/tmp/kiln-gpu"))
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--set", nargs="*", default=[], help="section.key=JSON overrides")
    ap.add_argument("--until", help="stop after this stage (e.g. to sweep U-Nets on its latents)")
    args = ap.parse_args()
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())  # the pipeline's own params
    raw["profile"] = args.profile
    for section, values in parse_overrides(args.set).items():
        raw.setdefault(section, {}).update(values)
    params = config.resolve(raw)
    out, clean = args.out, args.clean
    models = {s: out / "models" / s for s in ("vae", "clip", "unet")}
    times: dict[str, float] = {}
    stages = [
        ("train_vae", lambda: vae.run(params, clean, models["vae"], out / "ckpt/vae")),
        ("train_clip", lambda: clip.run(params, clean, models["clip"], out / "ckpt/clip")),
        (
            "precompute_latents",
            lambda: latents.run(params, clean, models["vae"], models["clip"], out / "latents"),
        ),
        (
            "train_unet",
            lambda: unet.run(
                params, out / "latents", models["vae"], models["unet"], out / "ckpt/unet"
            ),
        ),
        (
            "evaluate",
            lambda: evaluate.run(
                params, clean, models["vae"], models["clip"], models["unet"], out / "evaluation"
            ),
        ),
    ]
    E.say(f"device {E.device()}, profile {args.profile}")
    results = {}
    for name, body in stages:
        t0 = time.perf_counter()
        results[name] = body()
        times[name] = round(time.perf_counter() - t0, 1)
        E.say(f"{name}: {times[name]} s")
        if name == args.until:
            break
    metrics = results.get("evaluate", {})
    keep = {
        k: v
        for k, v in metrics.items()
        if isinstance(v, int | float) and not k.startswith("steps_")
    }
    print(
        json.dumps(
            {"device": str(E.device()), "stage_seconds": times, "metrics": keep},
            indent=1,
            sort_keys=True,
        )
    )


if __name__ == "__main__":
    main()
