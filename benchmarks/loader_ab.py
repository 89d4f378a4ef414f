"""Steps/s of the streaming loader vs the in-memory loader, interleaved in one run.

Usage (after `make run`, from the repository root; run it alone on the machine):
    .venv/bin/python benchmarks/loader_ab.py [--rounds 3] [--steps 150] [--stages train_vae ...]

Each training stage (tiny profile, the pipeline's own data/clean and data/latents) is
trained ``--steps`` steps with ``loader: memory`` and with ``loader: stream``,
alternating which goes first, ``--rounds`` times. The figure is the training loop's
samples/s, median over rounds (``train_seconds`` excludes the in-memory loader's
up-front decode, which favours it). The ratio is the median of the rounds' own
stream/memory ratios: the two runs of a round are next to each other in time. Both
loaders draw the same batches, so the weights come out identical: the script checks
that too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.torch import load_file  # noqa: E402

from training import paths as P  # noqa: E402
from training.config import load, resolve  # noqa: E402


def params_for(loader: str, steps: int):
    base = load("params.yaml").to_dict()
    for section in ("train_vae", "train_clip", "train_unet"):
        base[section].update(loader=loader, steps=steps, checkpoint_every=10**6, log_every=10**6)
    base["train_unet"]["preview_every"] = 0
    return resolve(base)


def train(stage: str, loader: str, steps: int, out: Path) -> tuple[float, Path]:
    from training.phases import clip, unet, vae

    p = params_for(loader, steps)
    if stage == "train_vae":
        m = vae.run(p, P.CLEAN, out, out / "ck")
        return m["samples_per_s"], out / "diffusion_pytorch_model.safetensors"
    if stage == "train_clip":
        m = clip.run(p, P.CLEAN, out, out / "ck")
        return m["samples_per_s"], out / "model.safetensors"
    m = unet.run(p, P.LATENTS, P.VAE, out, out / "ck")
    return m["samples_per_s"], out / "diffusion_pytorch_model.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--stages", nargs="+", default=["train_vae", "train_clip", "train_unet"])
    args = ap.parse_args()
    print(
        "| stage | memory samples/s | stream samples/s | stream / memory (median of rounds) "
        "| rounds' ratios | same weights |"
    )
    print("|---|---:|---:|---:|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            rates: dict[str, list[float]] = {"memory": [], "stream": []}
            same = True
            for r in range(args.rounds):
                order = ("memory", "stream") if r % 2 == 0 else ("stream", "memory")
                weights = {}
                for loader in order:
                    out = Path(tmp) / f"{stage}-{loader}-{r}"
                    rate, path = train(stage, loader, args.steps, out)
                    rates[loader].append(rate)
                    weights[loader] = load_file(path)
                a, b = weights["memory"], weights["stream"]
                same &= all((a[k] == b[k]).all() for k in a)
            mem, stream = (statistics.median(rates[k]) for k in ("memory", "stream"))
            ratios = [s / m for s, m in zip(rates["stream"], rates["memory"], strict=True)]
            print(
                f"| {stage} | {mem:.0f} | {stream:.0f} | {statistics.median(ratios):.3f} | "
                f"{' '.join(f'{r:.2f}' for r in ratios)} | {'yes' if same else 'NO'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
