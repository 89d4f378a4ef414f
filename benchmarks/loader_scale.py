"""Peak RSS of each training stage at 1x, 10x and 100x the data, streaming vs in memory.

Usage (from the repository root; run it alone: it writes several GB under --dir):
    .venv/bin/python benchmarks/loader_scale.py [--dir /tmp/kiln-scale] [--base 2000]
        [--scales 1 10 100] [--steps 10]

For each scale it writes a clean split of the built-in shapes at 64 px (``base x scale``
training samples, 256 validation samples) and a latents split of the same size laid out
as precompute_latents writes it (4x16x16 latents, 24x256 16-bit text states: the
``small`` profile's shapes), then trains each stage ``--steps`` steps in a fresh
process and reads its peak RSS (``ru_maxrss``). The in-memory loader runs at the
scales whose decoded data fits in RAM. "Decoded" is what the in-memory loader holds for
the split: uint8 pixels, float32 latents and 16-bit text states. The criterion (issue
#14): RSS growth from 1x to 10x under 10% of the growth of the decoded data.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from tests.loaderkit import (  # noqa: E402
    STAGE_CALLS,
    latents_dir,
    peak_rss_mib,
    shapes_split,
    stage_process,
)

SIZE, LATENT, TEXT = 64, (4, 16, 16), (24, 256)
PER_SAMPLE = {  # bytes per sample the in-memory loader holds (uint8 pixels; latents as stored)
    "vae": 3 * SIZE * SIZE,
    "clip": 3 * SIZE * SIZE,
    "unet": 2 * LATENT[0] * LATENT[1] * LATENT[2] * 4 + TEXT[0] * TEXT[1] * 2,
}


def params(loader: str, steps: int) -> dict:
    knobs = {"loader": loader, "steps": steps, "batch_size": 32, "checkpoint_every": 10**6}
    return {
        "ingest": {"image_size": SIZE},
        "train_vae": {**knobs, "val_samples": 256},
        "train_clip": {**knobs, "patch_size": 8, "val_samples": 256},
        "train_unet": {**knobs, "preview_every": 0},
    }


def build(root: Path, n: int) -> None:
    t0 = time.perf_counter()
    shapes_split(root / "clean" / "train", n, SIZE)
    shapes_split(root / "clean" / "val", 256, SIZE, seed=1, prefix="val")
    latents_dir(root / "latents", n, latent=LATENT, text=TEXT)
    proc = stage_process(
        root, "vae.build(params).save_pretrained(root / 'vae')", params("stream", 1)
    )
    proc.check_returncode()
    print(f"# wrote {n} samples in {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/tmp/kiln-scale"))
    ap.add_argument("--base", type=int, default=2000)
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    ram = psutil.virtual_memory().total
    rows: dict[tuple[str, str], dict[int, float]] = {}
    for scale in args.scales:
        n = args.base * scale
        root = args.dir / f"x{scale}"
        if not (root / "vae").is_dir():
            shutil.rmtree(root, ignore_errors=True)
            build(root, n)
        for stage in ("vae", "clip", "unet"):
            for loader in ("stream", "memory"):
                if loader == "memory" and n * PER_SAMPLE[stage] * 3 > ram:
                    continue  # would not fit (decoded, plus the decode's own copies)
                proc = stage_process(root, STAGE_CALLS[stage], params(loader, args.steps))
                if proc.returncode:
                    sys.exit(f"{stage}/{loader} at {scale}x failed:\n{proc.stderr[-3000:]}")
                rows.setdefault((stage, loader), {})[scale] = peak_rss_mib(proc)
                print(
                    f"# {stage} {loader} {scale}x: {rows[stage, loader][scale]:.0f} MiB", flush=True
                )
    print(
        "| stage | loader | " + " | ".join(f"{s}x peak RSS MiB" for s in args.scales) + " | "
        "decoded growth 1x->10x MiB | RSS growth 1x->10x MiB | RSS growth / decoded growth |"
    )
    print("|---|---|" + "---:|" * (len(args.scales) + 3))
    for (stage, loader), by_scale in rows.items():
        cells = [f"{by_scale[s]:.0f}" if s in by_scale else "—" for s in args.scales]
        decoded = args.base * 9 * PER_SAMPLE[stage] / 2**20
        growth = by_scale.get(10, float("nan")) - by_scale.get(1, float("nan"))
        print(
            f"| {stage} | {loader} | {' | '.join(cells)} | {decoded:.0f} | {growth:.0f} | "
            f"{growth / decoded:.3f} |"
        )


if __name__ == "__main__":
    main()
