"""What buys VAE detail on real pictures: the train_vae stage on Twemoji (32 px, or 64 px
with --profile tiny64) with params.yaml overrides, one row of val PSNR / SSIM a variant.

Usage (from the repository root, alone on the machine):
    .venv/bin/python benchmarks/vae_budget.py [--work DIR] [--profile P] NAME=KEY=VALUE[,..] ..
e.g.  base=  steps1800=train_vae.steps=1800  lat8=train_vae.latent_channels=8

Ingests and validates the Twemoji collection (tests/realkit.py, fetched from npm) once
into a project copy under --work (default /tmp/kiln-vae-budget; re-used when there),
then runs `kiln train-vae` per variant on the same clean shards, each from scratch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from tests.conftest import copy_project, kiln  # noqa: E402
from tests.realkit import emoji_folder  # noqa: E402
from training import config  # noqa: E402


def prepare(work: Path, profile: str) -> Path:
    project = work / "kiln"
    built = project / "data" / "clean" / "train" / "index.json"
    if built.exists() and config.load(project / "params.yaml").profile == profile:
        return project  # another profile's shards hold pictures of another size: rebuilt
    shutil.rmtree(work, ignore_errors=True)
    folder = emoji_folder(work / "emoji")
    project = copy_project(project)
    config.set_values(
        project / "params.yaml",
        {"profile": profile, "ingest.dataset": "folder", "ingest.source": str(folder)},
    )
    for stage in ("ingest", "validate"):
        kiln(project, stage, timeout=3600)
    return project


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/kiln-vae-budget"))
    ap.add_argument("--profile", default="tiny", help="tiny (32 px) or tiny64 (64 px)")
    ap.add_argument("variants", nargs="+", help="NAME=KEY=VALUE[,KEY=VALUE]; NAME= for defaults")
    args = ap.parse_args()
    project = prepare(args.work, args.profile)
    params = project / "params.yaml"
    original = params.read_text()
    print("| variant | overrides | val PSNR dB | val SSIM | wall s |")
    print("|---|---|---:|---:|---:|")
    for item in args.variants:
        name, _, rest = item.partition("=")
        updates = {}
        for pair in filter(None, rest.split(",")):
            key, _, value = pair.partition("=")
            updates[key] = yaml.safe_load(value)
        params.write_text(original)
        shutil.rmtree(project / "data" / "checkpoints" / "train_vae", ignore_errors=True)
        try:
            if updates:
                config.set_values(params, updates)
            t0 = time.perf_counter()
            kiln(project, "train-vae", timeout=6 * 3600)
            wall = time.perf_counter() - t0
        finally:
            params.write_text(original)
        m = json.loads((project / "data" / "metrics" / "train_vae.json").read_text())
        shown = ", ".join(f"{k}={v}" for k, v in updates.items()) or "profile defaults"
        print(f"| {name} | {shown} | {m['val_psnr']:.2f} | {m['val_ssim']:.3f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
