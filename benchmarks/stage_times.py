"""Print where a pipeline run's time went, as a markdown table, from data/metrics/*.json.

Usage (after `make run` or `kiln run`, from the repository root):
    .venv/bin/python benchmarks/stage_times.py [PROJECT_DIR]

Each stage records its own wall time (`stage_seconds`: config load to registered model,
inside the `kiln` process) and, for training stages, the time spent in the training loop
(`train_seconds`). The gap between the sum and the wall time of `make run` is process
start-up (imports), DVC and Prefect.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.stages import NAMES as STAGES  # noqa: E402


def main(root: Path) -> None:
    total = 0.0
    print("| stage | wall s | training loop s | notes |")
    print("|---|---:|---:|---|")
    for stage in STAGES:
        path = root / "data" / "metrics" / f"{stage}.json"
        if not path.is_file():
            print(f"| {stage} | — | — | not run |")
            continue
        m = json.loads(path.read_text())
        wall = m.get("stage_seconds", 0.0)
        total += wall
        train = f"{m['train_seconds']:.0f}" if "train_seconds" in m else ""
        notes = []
        if "successes" in m:
            notes.append(f"{m['successes']} images")
        if "train" in m and "val" in m:
            notes.append(f"{m['train']} train / {m['val']} val / {m.get('rejected', 0)} rejected")
        if "samples_per_s" in m:
            notes.append(f"{m['samples_per_s']:.0f} samples/s")
        if "images_per_s" in m:
            notes.append(f"{m['samples']} samples at {m['images_per_s']:.1f} images/s")
        print(f"| {stage} | {wall:.0f} | {train} | {', '.join(notes)} |")
    print(f"| **sum of stages** | **{total:.0f}** | | |")


if __name__ == "__main__":
    if sys.argv[1:2] in (["-h"], ["--help"]):
        sys.exit(__doc__)
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd())
