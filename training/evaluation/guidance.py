"""The guidance scale a model samples at by default, chosen per model on its own data.

Classifier-free guidance trades the spread of the samples for how closely they follow
their prompts, and where the trade is best depends on the model and its data: tiny
shapes grade best near 2, while Twemoji's samples come closest to real pictures near 1.5
and over-guide at 4 (benchmarks/RESULTS.md, "Real data: guidance"). One constant cannot
serve both, so for data without an oracle ``evaluate`` measures each of
``evaluate.guidance_candidates`` and the pipeline it registers carries the winner
(``sampling.SAMPLER_FILE``): ``kiln generate``, the REST model and the playground
default to it.

The rule, and why:
- One sample per distinct val caption (at most ``MAX_PROMPTS``) at each candidate, the
  same seeds for every candidate, embedded by the CLIP the distribution metrics use.
- Scored by Fréchet distance to ``REFERENCE`` training images (a seeded random pick; the
  shards keep the collection's order), not to the val images: those are what evaluate's
  reported ``fd_clip`` compares with, and a choice made on them would grade itself.
- The lowest FD wins. FD does not read the prompts, so guidance below the candidates
  (1: none) would win on spread alone while following the captions less (Twemoji, CLIP
  score 0.36 at 1 against 0.41 at 1.5); the candidate list is the guard, and the CLIP
  score of each is recorded beside it.
- Built-in sets keep ``evaluate.guidance``: their prompt list is their test set, and
  their default was measured by their oracle (2). So does an empty candidate list.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from training import engine as E

REFERENCE = 1024  # training images the candidates are measured against
MAX_PROMPTS = 256  # distinct val captions sampled per candidate


def reference_images(clean_dir: Path, size: int, n: int = REFERENCE, seed: int = 0) -> list:
    """A seeded random pick of ``n`` training images (reservoir sampling: one pass over
    the shards, ``n`` records held), as centre squares of the trained size."""
    from training.engine.images import square
    from training.intake import shards

    rng = random.Random(seed)
    keep: list = []
    for i, r in enumerate(shards.read(shards.shard_paths(Path(clean_dir) / "train"))):
        if len(keep) < n:
            keep.append(r)
        elif (j := rng.randint(0, i)) < n:
            keep[j] = r
    return [square(r.image(), size) for r in keep]


def choose(
    pipe,
    captions: list[str],
    candidates: tuple[float, ...],
    clean_dir: Path,
    ruler_dir: Path,
    clip_dir: Path,
    size: int,
    steps: int,
    negative: str,
    seed: int,
    batch_size: int,
) -> dict:
    """``{"guidance": best, "table": [{"guidance", "fd_train", "clip_score"}, ...],
    "prompts": n, "reference": n}``, or ``{"skipped": why}`` when there is too little to
    measure (then the caller keeps its fixed guidance)."""
    from training.evaluation.metrics.clip_score import clip_scores
    from training.evaluation.metrics.distribution import (
        MIN_SAMPLES,
        clip_image_embeddings,
        frechet_distance,
    )
    from training.inference import sampling

    prompts = list(dict.fromkeys(captions))[:MAX_PROMPTS]
    refs = reference_images(clean_dir, size, seed=seed)
    if len(prompts) < MIN_SAMPLES or len(refs) < MIN_SAMPLES:
        return {
            "skipped": f"needs >= {MIN_SAMPLES} distinct val captions and training images, "
            f"have {len(prompts)} and {len(refs)}"
        }
    ref_e = clip_image_embeddings(ruler_dir, refs)
    table = []
    for g in candidates:
        requests = [
            sampling.Request(p, seed=seed + 7919 + i, steps=steps, guidance=g, negative=negative)
            for i, p in enumerate(prompts)
        ]
        images = sampling.generate(pipe, requests, batch_size=batch_size)
        fd = frechet_distance(clip_image_embeddings(ruler_dir, images), ref_e)
        clip = float(np.mean(clip_scores(clip_dir, prompts, images)))
        table.append({"guidance": float(g), "fd_train": fd, "clip_score": clip})
        E.say(f"evaluate: guidance {g:g}: FD to {len(refs)} training images {fd:.4f}, "
              f"CLIP score {clip:.3f} ({len(prompts)} val captions)")  # fmt: skip
    best = min(table, key=lambda row: row["fd_train"])
    return {
        "guidance": best["guidance"],
        "table": table,
        "prompts": len(prompts),
        "reference": len(refs),
    }
