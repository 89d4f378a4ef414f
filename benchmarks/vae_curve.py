"""Val PSNR along the VAE's whole step budget, per project: where `target_psnr` would
stop it (README "train_vae", RESULTS.md "VAE early stop").

Usage (from the repository root, alone on the machine):
    .venv/bin/python benchmarks/vae_curve.py NAME=PROJECT [NAME=PROJECT ...] [--every 200]
        [--set KEY=VALUE ...]

PROJECT is a Kiln project whose `data/clean` splits exist (after `kiln validate`). For
each, `training.phases.vae.run` trains the VAE from scratch with the project's params
and profile, `train_vae.target_psnr` off and `check_every` as given (``--set`` overrides
other train_vae keys for all, e.g. ``latent_channels=16``), into a scratch folder under
/tmp/kiln-vae-curve/NAME (the project's own models and checkpoints are not touched; the
trained VAE stays there). It prints one row per project: val PSNR at every check, the
final one, and the step `target_psnr` (default 30 dB) would have stopped at.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from training import config  # noqa: E402
from training.phases import vae  # noqa: E402


class Curve:
    """A metric logger that keeps the early-stop checks' val PSNR."""

    def __init__(self) -> None:
        self.points: dict[int, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "train_vae/val_psnr" in metrics and step is not None:
            self.points[step] = metrics["train_vae/val_psnr"]

    def log_image(self, path: Path) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("projects", nargs="+", help="NAME=PROJECT")
    ap.add_argument("--every", type=int, default=200)
    ap.add_argument("--target", type=float, default=30.0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a train_vae key for every project, e.g. latent_channels=16")  # fmt: skip
    args = ap.parse_args()
    rows = []
    for item in args.projects:
        name, _, project = item.partition("=")
        raw = yaml.safe_load((Path(project) / "params.yaml").read_text())
        raw.setdefault("train_vae", {}).update(check_every=args.every, target_psnr=None)
        for kv in args.set:
            key, _, value = kv.partition("=")
            raw["train_vae"][key] = yaml.safe_load(value)
        params = config.resolve(raw)
        work = Path("/tmp/kiln-vae-curve") / name
        shutil.rmtree(work, ignore_errors=True)
        curve, t0 = Curve(), time.perf_counter()
        clean = Path(project) / "data" / "clean"
        m = vae.run(params, clean, work / "vae", work / "ckpt", curve)
        wall = time.perf_counter() - t0
        stop = next((s for s, v in sorted(curve.points.items()) if v >= args.target), None)
        rows.append((name, params.train_vae.steps, curve.points, m["val_psnr"], stop, wall))
    steps = sorted({s for r in rows for s in r[2]})
    head = " | ".join(map(str, steps))
    print(f"| data | {head} | end | stops at ({args.target:g} dB) | wall s |")
    print("|---|" + "---:|" * (len(steps) + 3))
    for name, total, points, final, stop, wall in rows:
        cells = " | ".join(f"{points[s]:.2f}" if s in points else "" for s in steps)
        where = f"{stop} of {total}" if stop else "never"
        print(f"| {name} | {cells} | {final:.2f} | {where} | {wall:.0f} |")


if __name__ == "__main__":
    main()
