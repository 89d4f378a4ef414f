"""Incremental ingestion vs a full one, on a real collection (issue #16).

Usage (from the repository root, alone on the machine):
    .venv/bin/python benchmarks/ingest_sync.py [--grow 0.05] [--repeats 2]

Twemoji from npm (tests/realkit.py, 3,786 pictures with captions; never committed): a
seeded ``--grow`` fraction of the pictures is held back, the rest ingested; then they
come back and the folder is ingested again, once as a sync against the first output
and once from scratch into an empty folder. Both end with the same samples; the sync
fetches only the ones it lacks. Prints one markdown row per repeat and their ratio,
measured in the same run (in process, ``ingest.run``, tiny's ingest settings).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.realkit import emoji_folder  # noqa: E402
from training import config  # noqa: E402
from training.intake import ingest, shards  # noqa: E402


def _timed(params, out: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    report = ingest.run(params, out, out / ".work")
    return time.perf_counter() - t0, report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grow", type=float, default=0.05, help="fraction held back, then added")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = emoji_folder(Path(tmp) / "emoji")
        held = Path(tmp) / "held"
        held.mkdir()
        pictures = sorted(folder.glob("*.png"))
        for p in random.Random(0).sample(pictures, round(len(pictures) * args.grow)):
            for f in (p, p.with_suffix(".txt")):
                f.rename(held / f.name)
        params = config.resolve({"ingest": {"dataset": "folder", "source": str(folder)}})
        base = Path(tmp) / "base"
        first, _ = _timed(params, base)
        for f in held.iterdir():
            f.rename(folder / f.name)
        print("| run | rows fetched | rows kept | samples after | seconds |")
        print("|---|---:|---:|---:|---:|")
        print(f"| first ingest, {1 - args.grow:.0%} of the folder | — | — | — | {first:.1f} |")
        ratios = []
        for r in range(args.repeats):
            synced = Path(tmp) / f"synced-{r}"
            shutil.copytree(base, synced)
            t_sync, rep = _timed(params, synced)
            t_full, full = _timed(params, Path(tmp) / f"full-{r}")
            n_sync = sum(1 for _ in shards.read(shards.shard_paths(synced / "shards")))
            n_full = sum(
                1 for _ in shards.read(shards.shard_paths(Path(tmp) / f"full-{r}" / "shards"))
            )
            assert n_sync == n_full, (n_sync, n_full)
            print(f"| sync after +{args.grow:.0%} | {rep['rows_new']} | {rep['rows_kept']} "
                  f"| {n_sync} | {t_sync:.1f} |")  # fmt: skip
            print(f"| from scratch | {full['rows_new']} | 0 | {n_full} | {t_full:.1f} |")
            ratios.append(t_sync / t_full)
        print("sync / scratch: " + ", ".join(f"{x:.2f}" for x in ratios))


if __name__ == "__main__":
    main()
