"""The whole pipeline on a real collection: Twemoji clip art with free-text captions.

Usage (from the repository root, alone on the machine):
    .venv/bin/python benchmarks/real_data.py [--profile tiny] [--limit N] [--out DIR] [--keep]
        [KEY=VALUE ...]

Fetches the collection from npm (tests/realkit.py: 3,786 Twemoji at 64 px, captions from
emojibase; CC-BY 4.0 / MIT, never committed), runs `kiln run --dataset folder` on a
fresh copy of the repository with the given profile and params.yaml overrides (dotted
keys, YAML values: `train_unet.steps=3000`), and prints one markdown row: wall time and
the metrics the Real data issue (#15) targets. The evaluation report and the sample
grids are copied to --out (default /tmp/kiln-real/<profile>).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from tests.conftest import copy_project, kiln  # noqa: E402
from tests.realkit import emoji_folder  # noqa: E402
from training import config  # noqa: E402
from training.evaluation import guidance as G  # noqa: E402

COLUMNS = (
    ("vae_psnr", "evaluate", "{:.1f}"),
    ("vae_ssim", "evaluate", "{:.3f}"),
    ("val_i2t_r1", "train_clip", "{:.2f}"),
    ("val_t2i_r1", "train_clip", "{:.2f}"),
    ("context_length", "train_clip", "{:.0f}"),
    ("captions_truncated_frac", "train_clip", "{:.1%}"),
    ("val_loss", "evaluate", "{:.4f}"),
    ("fd_clip", "evaluate", "{:.3f}"),
    ("fd_clip_real_halves", "evaluate", "{:.3f}"),
    ("fd_clip_ratio", "evaluate", "{:.2f}"),
    ("cmmd_clip", "evaluate", "{:.3f}"),
    ("clip_score", "evaluate", "{:.3f}"),
    ("copies_frac", "evaluate", "{:.3f}"),
    ("copies_frac_val", "evaluate", "{:.3f}"),
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--limit", type=int, default=None, help="a seeded sample of N images")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the project in OUT/project")
    ap.add_argument("overrides", nargs="*", help="params.yaml KEY=VALUE (dotted keys)")
    args = ap.parse_args()
    updates = {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        updates[key] = yaml.safe_load(value)
    out = args.out or Path("/tmp/kiln-real") / args.profile
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = out if args.keep else Path(scratch)
        if args.keep:
            for old in ("project", "emoji"):
                shutil.rmtree(tmp / old, ignore_errors=True)
        folder = emoji_folder(tmp / "emoji", limit=args.limit)
        project = copy_project(tmp / ("project" if args.keep else "kiln"))
        if updates:  # checked against the profile's sizes (train_vae.crop < image_size)
            config.set_values(project / "params.yaml", {"profile": args.profile, **updates})
        t0 = time.perf_counter()
        proc = kiln(
            project, "run", "--dataset", "folder", "--source", str(folder),
            "--profile", args.profile, timeout=6 * 3600, check=False,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        (out / "run.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode:
            sys.exit(f"kiln run failed ({proc.returncode}); log: {out / 'run.log'}")
        metrics = {
            p.stem: json.loads(p.read_text()) for p in (project / "data" / "metrics").glob("*.json")
        }
        for name in ("report.html", "samples.png"):
            shutil.copy(project / "data" / "eval" / name, out / name)
        previews = sorted((project / "data" / "models" / "unet" / "previews").glob("*.png"))
        if previews:
            shutil.copy(previews[-1], out / "preview.png")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    seconds = {s: metrics[s].get("stage_seconds", 0) for s in metrics}
    head = "| profile | images | wall s | " + " | ".join(c for c, _, _ in COLUMNS)
    print(head + " | pooled fd ratio, as served |")
    print("|" + "---|" * (4 + len(COLUMNS)))
    cells = [
        fmt.format(metrics[stage][name]) if name in metrics.get(stage, {}) else "—"
        for name, stage, fmt in COLUMNS
    ]
    # the guidance choice's pooled ratio (training captions against other training
    # images, floor their own images: evaluation/guidance.py) at the guidance adopted
    e = metrics.get("evaluate", {})
    served = f"guidance_{G.label(e.get('guidance', 0), e.get('guidance_start', 0))}_fd_ratio"
    cells.append(f"{e[served]:.2f} at {G.describe(e['guidance'], e['guidance_start'])}"
                 if served in e else "—")  # fmt: skip
    n = metrics["validate"]["train"] + metrics["validate"]["val"]
    print(f"| {args.profile} | {n} | {wall:.0f} | " + " | ".join(cells) + " |")
    print("stage seconds: " + ", ".join(f"{s} {v:.0f}" for s, v in sorted(seconds.items())))
    print(f"report and grids: {out}")


if __name__ == "__main__":
    main()
