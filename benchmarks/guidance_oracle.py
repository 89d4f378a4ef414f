"""Oracle accuracy of a trained built-in-set project at several guidance scales.

Usage (from the repository root, on a project that ran ``kiln run --dataset shapes`` or
``digits``):
    .venv/bin/python benchmarks/guidance_oracle.py PROJECT 1,1.5,2,3,4 [--out FILE]

It draws what the evaluate stage draws (its prompt set, ``samples_per_prompt`` seeds
each, its scheduler and steps) at each guidance scale and grades the samples with the
set's oracle, so the row at the project's own ``evaluate.guidance`` reproduces its
``acc_all``: the check that this measures what evaluate measures. Used to choose the
default guidance (RESULTS.md, "Real data: guidance").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import config  # noqa: E402


def main() -> None:
    from training.evaluation import oracle as O
    from training.evaluation.metrics import oracle_accuracy
    from training.evaluation.metrics.base import Samples
    from training.evaluation.prompts import prompt_set
    from training.inference import sampling

    ap = argparse.ArgumentParser()
    ap.add_argument("project", type=Path)
    ap.add_argument("guidance", type=lambda v: [float(g) for g in v.split(",")])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    params = config.load(args.project / "params.yaml")
    oracle = O.for_dataset(params.oracle() or "")
    if oracle is None:
        sys.exit(f"{args.project}: not a built-in set (no oracle to grade by)")
    c, clean = params.evaluate, args.project / "data/clean"
    prompts = prompt_set(params, clean)
    pipe = sampling.load(args.project / "data/eval/pipeline")
    sampling.set_scheduler(pipe, c.scheduler)
    out = {}
    print("| guidance | acc_all | seen | held-out |\n|---:|---:|---:|---:|")
    for g in args.guidance:
        requests = [
            sampling.Request(p.prompt, seed=params.seed + 1000 * j + i, steps=c.steps, guidance=g)
            for j in range(c.samples_per_prompt)
            for i, p in enumerate(prompts)
        ]
        truths = [p for _ in range(c.samples_per_prompt) for p in prompts]
        images = sampling.generate(pipe, requests)
        s = Samples(params, images, [r.prompt for r in requests], truths, oracle, clean,
                    args.project, args.project)  # fmt: skip
        m = out[g] = oracle_accuracy.score(s)
        cells = [f"{m[k]:.3f}" if k in m else "—"  # digits have no held-out group
                 for k in ("acc_all", "acc_all_seen", "acc_all_held_out")]  # fmt: skip
        print(f"| {g:g} | {' | '.join(cells)} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
