"""The guidance scale a model samples at by default, chosen per model on its own data.

Classifier-free guidance trades the spread of the samples for how closely they follow
their prompts, and where the trade is best depends on the model and its data: tiny
shapes grade best near 2, while Twemoji's samples come closest to real pictures near 1.5
and over-guide at 4 (benchmarks/RESULTS.md, "Real data: guidance"). One constant cannot
serve both, so for data without an oracle ``evaluate`` measures each of
``evaluate.guidance_candidates`` and the pipeline it registers carries the winner
(``inference/defaults.py``): ``kiln generate``, the REST model and the playground
default to it.

The rule, and why:
- One sample per distinct val caption (at most ``MAX_PROMPTS``) at each candidate, the
  same seeds for every candidate, embedded by the CLIP the distribution metrics use.
- Scored by Fréchet distance to ``REFERENCE`` training images (a seeded random pick; the
  shards keep the collection's order), not to the val images: those are what evaluate's
  reported ``fd_clip`` compares with, and a choice made on them would grade itself.
- The lowest FD wins. FD does not read the prompts, and against images of other
  captions a wider spread can score well while following the captions less (Twemoji,
  CLIP score 0.36 at 1 against 0.41 at 1.5); the candidate list is the guard, and the
  CLIP score of each is recorded beside it. Measured against the captions' own images
  (RESULTS.md "the pooled floor, matched"), 1.5 also beats 1 on FD (Twemoji, tiny).
- Built-in sets keep ``evaluate.guidance``: their prompt list is their test set, and
  their default was measured by their oracle (2). So does an empty candidate list.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training import engine as E
from training.config import Params

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

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
    pipe: DiffusionPipeline,
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
    if len(prompts) < MIN_SAMPLES:  # checked before the pass over the training split
        return {"skipped": f"needs >= {MIN_SAMPLES} distinct val captions, have {len(prompts)}"}
    refs = reference_images(clean_dir, size, seed=seed)
    if len(refs) < MIN_SAMPLES:
        return {"skipped": f"needs >= {MIN_SAMPLES} training images, have {len(refs)}"}
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
    finite = [row for row in table if np.isfinite(row["fd_train"])]
    if not finite:  # e.g. a degenerate covariance: no figure to choose by
        return {"skipped": "no candidate has a finite FD to the training images"}
    best = min(finite, key=lambda row: row["fd_train"])  # a tie: the earlier candidate
    return {
        "guidance": best["guidance"],
        "table": table,
        "prompts": len(prompts),
        "reference": len(refs),
    }


def adopt(
    params: Params, pipe: DiffusionPipeline, prompts: list, clean_dir: Path,
    ruler_dir: Path, clip_dir: Path, metrics: dict[str, Any], tables: dict[str, str],
) -> float:  # fmt: skip
    """The guidance this evaluation samples at and the pipeline ships with:
    ``evaluate.guidance``, or for data without an oracle the best of
    ``evaluate.guidance_candidates`` (``choose``). Fills ``metrics``
    (``guidance``, ``guidance_source``, one FD and CLIP score per candidate) and the
    report's table of the candidates."""
    from training.evaluation import figures as X

    c = params.evaluate
    metrics["guidance"] = c.guidance
    if params.oracle():
        metrics["guidance_source"] = "evaluate.guidance (a built-in set: graded by its oracle)"
        return c.guidance
    if not c.guidance_candidates:
        metrics["guidance_source"] = "evaluate.guidance (no guidance_candidates)"
        return c.guidance
    if len(c.guidance_candidates) == 1:  # nothing to choose between: no sampling for it
        metrics["guidance"] = c.guidance_candidates[0]
        metrics["guidance_source"] = "evaluate.guidance_candidates (the only one)"
        return c.guidance_candidates[0]
    got = choose(
        pipe, [p.prompt for p in prompts], c.guidance_candidates, clean_dir, ruler_dir,
        clip_dir, params.ingest.image_size, c.steps, c.negative_prompt, params.seed,
        c.batch_size,
    )  # fmt: skip
    if "skipped" in got:
        metrics["guidance_choice_skipped"] = got["skipped"]
        metrics["guidance_source"] = "evaluate.guidance (the choice was skipped)"
        return c.guidance
    for row in got["table"]:
        metrics[f"guidance_{row['guidance']:g}_fd_train"] = row["fd_train"]
        metrics[f"guidance_{row['guidance']:g}_clip_score"] = row["clip_score"]
    metrics["guidance"] = got["guidance"]
    metrics["guidance_source"] = (
        f"chosen: the lowest FD to {got['reference']} training images among "
        + ", ".join(f"{g:g}" for g in c.guidance_candidates)
    )
    E.say(f"evaluate: guidance {got['guidance']:g} chosen ({metrics['guidance_source']})")
    tables[
        f"Guidance chosen for this model: {got['guidance']:g} ({got['prompts']} val captions, "
        f"one seed each, at each scale; FD to {got['reference']} training images, lower is "
        "closer; CLIP score, higher follows the captions more)"
    ] = X.table_html(
        [
            {"guidance": f"{r['guidance']:g}", "FD to training images": f"{r['fd_train']:.4f}",
             "CLIP score": f"{r['clip_score']:.3f}",
             "chosen": "yes" if r["guidance"] == got["guidance"] else ""}
            for r in got["table"]
        ]
    )  # fmt: skip
    return got["guidance"]
