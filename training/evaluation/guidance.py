"""The guidance a model samples at by default, chosen per model on its own data.

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
- ``evaluate.guidance_interval_candidates`` adds (scale, start) pairs: the noisiest
  ``start`` of the steps unguided, the rest guided (``SamplerDefaults.guidance_start``).
  Measured against the captions' own images, guidance 3 from 40% of the steps on was
  closer to Twemoji than 1.5 throughout for two of four models and as close for the
  others, while 1.5 or 2 from 40% on were further (RESULTS.md "guidance in a limited
  interval"); this rule's few-caption FD ranks those the other way round, so only the
  pair that measured well is offered.
- The lowest FD wins. FD does not read the prompts, and against images of other
  captions a wider spread can score well while following the captions less (Twemoji,
  CLIP score 0.36 at 1 against 0.41 at 1.5); the candidate list is the guard, and the
  CLIP score of each is recorded beside it. Measured against the captions' own images
  (RESULTS.md "the pooled floor, matched"), 1.5 also beats 1 on FD (Twemoji, tiny).
- Built-in sets keep ``evaluate.guidance`` and ``evaluate.guidance_start``: their prompt
  list is their test set, and their default was measured by their oracle (2, every
  step). So does an empty candidate list.
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


def label(guidance: float, start: float) -> str:
    """A candidate in the metric names: ``3``, or ``3_from0.4`` (guided from 40% of the
    steps on); a start of 0 keeps the names of the scale alone."""
    return f"{guidance:g}" if not start else f"{guidance:g}_from{start:g}"


def pairs(
    scales: tuple[float, ...], intervals: tuple[tuple[float, float], ...] = ()
) -> list[tuple[float, float]]:
    """The (scale, start) candidates: each scale guided at every step, then each interval
    pair. A scale of at most 1 is not guided at all (diffusers skips the unconditional
    branch), so its start changes nothing and it counts as start 0; a repeat is dropped."""
    out: list[tuple[float, float]] = []
    for g, s in [(g, 0.0) for g in scales] + list(intervals):
        pair = (float(g), float(s) if g > 1 else 0.0)
        if pair not in out:
            out.append(pair)
    return out


def choose(
    pipe: DiffusionPipeline,
    captions: list[str],
    candidates: list[tuple[float, float]],
    clean_dir: Path,
    ruler_dir: Path,
    clip_dir: Path,
    size: int,
    steps: int,
    negative: str,
    seed: int,
    batch_size: int,
) -> dict:
    """``candidates``: (scale, guidance_start) pairs. ``{"guidance": best scale, "start":
    its start, "table": [{"guidance", "start", "fd_train", "clip_score"}, ...], "prompts":
    n, "reference": n}``, or ``{"skipped": why}`` when there is too little to measure
    (then the caller keeps its fixed guidance)."""
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
    for g, start in candidates:
        requests = [
            sampling.Request(p, seed=seed + 7919 + i, steps=steps, guidance=g, negative=negative,
                             guidance_start=start)
            for i, p in enumerate(prompts)
        ]  # fmt: skip
        images = sampling.generate(pipe, requests, batch_size=batch_size)
        fd = frechet_distance(clip_image_embeddings(ruler_dir, images), ref_e)
        clip = float(np.mean(clip_scores(clip_dir, prompts, images)))
        table.append({"guidance": float(g), "start": float(start), "fd_train": fd,
                      "clip_score": clip})  # fmt: skip
        E.say(f"evaluate: guidance {describe(g, start)}: FD to {len(refs)} training images "
              f"{fd:.4f}, CLIP score {clip:.3f} ({len(prompts)} val captions)")  # fmt: skip
    finite = [row for row in table if np.isfinite(row["fd_train"])]
    if not finite:  # e.g. a degenerate covariance: no figure to choose by
        return {"skipped": "no candidate has a finite FD to the training images"}
    best = min(finite, key=lambda row: row["fd_train"])  # a tie: the earlier candidate
    return {
        "guidance": best["guidance"],
        "start": best["start"],
        "table": table,
        "prompts": len(prompts),
        "reference": len(refs),
    }


def describe(guidance: float, start: float) -> str:
    """``3`` or ``3 from 40% of the steps on``: a (scale, start) pair in words."""
    return f"{guidance:g}" if not start else f"{guidance:g} from {start:.0%} of the steps on"


def adopt(
    params: Params, pipe: DiffusionPipeline, prompts: list, clean_dir: Path,
    ruler_dir: Path, clip_dir: Path, metrics: dict[str, Any], tables: dict[str, str],
) -> tuple[float, float]:  # fmt: skip
    """The guidance (scale, guidance_start) this evaluation samples at and the pipeline
    ships with: ``evaluate.guidance`` and ``evaluate.guidance_start``, or for data without
    an oracle the best of ``evaluate.guidance_candidates`` (each guided at every step) and
    ``guidance_interval_candidates`` (``choose``). Fills ``metrics`` (``guidance``,
    ``guidance_start``, ``guidance_source``, one FD and CLIP score per candidate) and the
    report's table of the candidates."""
    from training.evaluation import figures as X

    c = params.evaluate
    fixed = (c.guidance, c.guidance_start)
    metrics["guidance"], metrics["guidance_start"] = fixed
    if params.oracle():
        metrics["guidance_source"] = "evaluate.guidance (a built-in set: graded by its oracle)"
        return fixed
    candidates = pairs(c.guidance_candidates, c.guidance_interval_candidates)
    if not candidates:
        metrics["guidance_source"] = "evaluate.guidance (no candidates)"
        return fixed
    if len(candidates) == 1:  # nothing to choose between: no sampling for it
        metrics["guidance"], metrics["guidance_start"] = candidates[0]
        metrics["guidance_source"] = "the only candidate"
        return candidates[0]
    got = choose(
        pipe, [p.prompt for p in prompts], candidates, clean_dir, ruler_dir,
        clip_dir, params.ingest.image_size, c.steps, c.negative_prompt, params.seed,
        c.batch_size,
    )  # fmt: skip
    if "skipped" in got:
        metrics["guidance_choice_skipped"] = got["skipped"]
        metrics["guidance_source"] = "evaluate.guidance (the choice was skipped)"
        return fixed
    for row in got["table"]:
        name = label(row["guidance"], row["start"])
        metrics[f"guidance_{name}_fd_train"] = row["fd_train"]
        metrics[f"guidance_{name}_clip_score"] = row["clip_score"]
    best = (got["guidance"], got["start"])
    metrics["guidance"], metrics["guidance_start"] = best
    metrics["guidance_source"] = (
        f"chosen: the lowest FD to {got['reference']} training images among "
        + ", ".join(describe(*p) for p in candidates)
    )
    E.say(f"evaluate: guidance {describe(*best)} chosen ({metrics['guidance_source']})")
    tables[
        f"Guidance chosen for this model: {describe(*best)} ({got['prompts']} val captions, "
        f"one seed each, at each scale and start; FD to {got['reference']} training images, "
        "lower is closer; CLIP score, higher follows the captions more)"
    ] = X.table_html(
        [
            {"guidance": f"{r['guidance']:g}",
             "unguided steps": f"first {r['start']:.0%}" if r["start"] else "none",
             "FD to training images": f"{r['fd_train']:.4f}",
             "CLIP score": f"{r['clip_score']:.3f}",
             "chosen": "yes" if (r["guidance"], r["start"]) == best else ""}
            for r in got["table"]
        ]
    )  # fmt: skip
    return best
