"""How far the pooled FD ratio, and evaluate's guidance choice, move with the pick of
captions and the sampling seeds, on one trained project.

Usage (from the repository root, alone on the machine, on a project that ran ``kiln run``
on data without an oracle):
    .venv/bin/python benchmarks/choice_spread.py PROJECT --seeds 1,2,3,4 [--pool 512]
    .venv/bin/python benchmarks/choice_spread.py PROJECT --offsets 0,7919,20000

``--seeds``: evaluate's own rule (``evaluation/guidance.choose``) at each seed, which
picks other training captions, another reference and other sampling seeds each time.
``--offsets``: ``benchmarks/pooled_own.py``'s fixed pick (640 captions against 1,024
other training images) with only the sampling seeds moved. Both at the two default
candidates, 1.5 throughout and 3 from 40% of the steps on; one JSON line per seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CANDIDATES = [(1.5, 0.0), (3.0, 0.4)]


def by_seed(project: Path, seeds: list[int], n_pool: int) -> None:
    from training import config
    from training.evaluation import guidance as G
    from training.inference import sampling

    params = config.load(project / "params.yaml")
    pipe = sampling.load(project / "data/eval/pipeline")
    clip = project / "data/models/clip"
    for seed in seeds:
        t = time.perf_counter()
        got = G.choose(pipe, CANDIDATES, project / "data/clean", clip, clip,
                       params.ingest.image_size, params.evaluate.steps, "", seed,
                       params.evaluate.batch_size, n_pool)  # fmt: skip
        if "skipped" in got:
            sys.exit(f"seed {seed}: {got['skipped']}")
        ratios = {G.label(r["guidance"], r["start"]): round(r["fd_ratio"], 3) for r in got["table"]}
        print(json.dumps({"seed": seed, "pool": got["prompts"], "floor": round(got["floor"], 4),
                          **ratios, "s": round(time.perf_counter() - t)}), flush=True)  # fmt: skip


def by_offset(project: Path, offsets: list[int]) -> None:
    from benchmarks.common_space import draw, pooled, train_pool
    from training.evaluation import guidance as G
    from training.evaluation.metrics.distribution import clip_image_embeddings

    clip = project / "data/models/clip"
    ref, pool, caps = train_pool(project, 1024, 640)
    ref_e, floor_e = clip_image_embeddings(clip, ref), clip_image_embeddings(clip, pool)
    cache = project.parent / "pooled-samples" / f"{project.name}-offsets"
    for off in offsets:
        row: dict = {"offset": off}
        for g, s in CANDIDATES:
            images = draw(project, caps, off, g, cache / f"{off}-{G.label(g, s)}", None, s)
            q = pooled(clip_image_embeddings(clip, images), ref_e, floor_e)
            row[G.label(g, s)] = round(q["fd_ratio"], 3)
        print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("project", type=Path)
    ints = lambda v: [int(x) for x in v.split(",") if x]  # noqa: E731
    ap.add_argument("--seeds", type=ints, default=[])
    ap.add_argument("--offsets", type=ints, default=[])
    ap.add_argument("--pool", type=int, default=512)
    args = ap.parse_args()
    if not args.seeds and not args.offsets:
        ap.error("give --seeds, --offsets or both")
    if args.seeds:
        by_seed(args.project, args.seeds, args.pool)
    if args.offsets:
        by_offset(args.project, args.offsets)


if __name__ == "__main__":
    main()
