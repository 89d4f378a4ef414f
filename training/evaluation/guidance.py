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
- ``evaluate.guidance_pool`` training captions (a seeded random pick), one sample each
  at each candidate, the same seeds for every candidate, embedded by the CLIP the
  distribution metrics use.
- Scored by Fréchet distance to ``REFERENCE`` *other* training images; the floor is the
  pool captions' own images against the same reference, so each candidate also gets its
  ratio to that floor (COCO-style FID with a disjoint real reference: samples and floor
  have the same captions, as many). Nothing from the val split: that is what evaluate's
  reported ``fd_clip`` compares with, and a choice made on it would grade itself.
- Why training captions and not the val captions (until 2026-12-06): a few distinct val
  captions (149 on Twemoji) cover few subjects; FD's finite-sample bias then weighs the
  samples' spread more than their closeness, and no matched floor can be formed, so the
  choice had no ratio to report. The pooled figure moves with the pick of captions
  too: one tiny Twemoji model read 1.33-1.88x its floor at 1.5 over seven picks and
  seeds, and 1.5 against 3 from 40% of the steps came out either way by pick (RESULTS.md "the
  pooled ratio over caption picks"): between those two the choice is close to a coin,
  and it is the scales further off that the rule keeps from being served. Samples for
  training captions could flatter a model that hands its training images back;
  evaluate's memorisation check (val captions, nearest of the whole split) reports
  copies on its own.
- ``evaluate.guidance_interval_candidates`` adds (scale, start) pairs: the noisiest
  ``start`` of the steps unguided, the rest guided (``SamplerDefaults.guidance_start``).
  Pooled, guidance 3 from 40% of the steps on was the closest for some Twemoji models
  and 1.5 throughout for others (RESULTS.md "guidance in a limited interval"), so the
  default offers both, and 2 and 3 throughout, which no pooled measurement found closest,
  are left out to halve the sampling.
- The lowest FD wins. FD does not read the prompts, and a wider spread can score well
  while following the captions less (Twemoji, CLIP score 0.36 at 1 against 0.41 at
  1.5): the candidate list is the guard, and the CLIP score of each is recorded beside it.
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


def training_pool(
    clean_dir: Path, size: int, n_pool: int, n_ref: int = REFERENCE, seed: int = 0
) -> tuple[list, list, list[str]]:
    """(reference images, pool images, pool captions): a seeded random pick of training
    records (reservoir sampling, one pass over the shards, which keep the collection's
    order), split in two disjoint parts, images as centre squares of the trained size.
    A train split smaller than ``n_pool + n_ref`` is shared in the same proportion."""
    from training.engine.images import square
    from training.intake import shards

    rng = random.Random(seed)
    want = n_pool + n_ref
    keep: list = []
    for i, r in enumerate(shards.read(shards.shard_paths(Path(clean_dir) / "train"))):
        if len(keep) < want:
            keep.append(r)
        elif (j := rng.randint(0, i)) < want:
            keep[j] = r
    rng.shuffle(keep)  # the reservoir's first slots hold the split's first records
    n = n_pool if len(keep) == want else round(len(keep) * n_pool / want)
    pool, ref = keep[:n], keep[n:]
    return (
        [square(r.image(), size) for r in ref],
        [square(r.image(), size) for r in pool],
        [r.caption for r in pool],
    )


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
    candidates: list[tuple[float, float]],
    clean_dir: Path,
    ruler_dir: Path,
    clip_dir: Path,
    size: int,
    steps: int,
    negative: str,
    seed: int,
    batch_size: int,
    n_pool: int,
    n_ref: int = REFERENCE,
) -> dict:
    """``candidates``: (scale, guidance_start) pairs. ``{"guidance": best scale, "start":
    its start, "table": [{"guidance", "start", "fd_train", "fd_ratio", "clip_score"},
    ...], "floor": the pool images' FD, "prompts": n, "reference": n}``, or
    ``{"skipped": why}`` when there is too little to measure (then the caller keeps its
    fixed guidance)."""
    from training.evaluation.metrics.clip_score import clip_scores
    from training.evaluation.metrics.distribution import (
        MIN_SAMPLES,
        clip_image_embeddings,
        frechet_distance,
    )
    from training.inference import sampling

    refs, pool, prompts = training_pool(clean_dir, size, n_pool, n_ref, seed)
    if min(len(refs), len(pool)) < MIN_SAMPLES:
        return {"skipped": f"needs >= {MIN_SAMPLES} training images for the pool and as many "
                           f"for the reference, have {len(pool)} and {len(refs)}"}  # fmt: skip
    ref_e = clip_image_embeddings(ruler_dir, refs)
    floor = frechet_distance(clip_image_embeddings(ruler_dir, pool), ref_e)
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
        # no floor to divide by (identical images): NaN, not fd_clip_ratio's 1e-12 clamp,
        # which would read as a huge ratio; the choice goes by fd_train either way
        ratio = fd / floor if floor > 0 else float("nan")
        table.append({"guidance": float(g), "start": float(start), "fd_train": fd,
                      "fd_ratio": ratio, "clip_score": clip})  # fmt: skip
        E.say(f"evaluate: guidance {describe(g, start)}: FD to {len(refs)} training images "
              f"{fd:.4f} ({ratio:.2f}x the captions' own images), CLIP score {clip:.3f} "
              f"({len(prompts)} training captions)")  # fmt: skip
    finite = [row for row in table if np.isfinite(row["fd_train"])]
    if not finite:  # e.g. a degenerate covariance: no figure to choose by
        return {"skipped": "no candidate has a finite FD to the training images"}
    best = min(finite, key=lambda row: row["fd_train"])  # a tie: the earlier candidate
    return {
        "guidance": best["guidance"],
        "start": best["start"],
        "table": table,
        "floor": floor,
        "prompts": len(prompts),
        "reference": len(refs),
    }


def describe(guidance: float, start: float) -> str:
    """``3`` or ``3 from 40% of the steps on``: a (scale, start) pair in words."""
    return f"{guidance:g}" if not start else f"{guidance:g} from {start:.0%} of the steps on"


def adopt(
    params: Params, pipe: DiffusionPipeline, clean_dir: Path, ruler_dir: Path,
    clip_dir: Path, metrics: dict[str, Any], tables: dict[str, str],
) -> tuple[float, float]:  # fmt: skip
    """The guidance (scale, guidance_start) this evaluation samples at and the pipeline
    ships with: ``evaluate.guidance`` and ``evaluate.guidance_start``, or for data without
    an oracle the best of ``evaluate.guidance_candidates`` (each guided at every step) and
    ``guidance_interval_candidates`` (``choose``). Fills ``metrics`` (``guidance``,
    ``guidance_start``, ``guidance_source``, per candidate its FD, its ratio to the floor and
    its CLIP score, and ``guidance_fd_floor``) and the report's table of the candidates."""
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
        pipe, candidates, clean_dir, ruler_dir, clip_dir, params.ingest.image_size,
        c.steps, c.negative_prompt, params.seed, c.batch_size, c.guidance_pool,
    )  # fmt: skip
    if "skipped" in got:
        metrics["guidance_choice_skipped"] = got["skipped"]
        metrics["guidance_source"] = "evaluate.guidance (the choice was skipped)"
        return fixed
    for row in got["table"]:
        name = label(row["guidance"], row["start"])
        metrics[f"guidance_{name}_fd_train"] = row["fd_train"]
        metrics[f"guidance_{name}_clip_score"] = row["clip_score"]
        metrics[f"guidance_{name}_fd_ratio"] = row["fd_ratio"]
    metrics["guidance_fd_floor"] = got["floor"]
    best = (got["guidance"], got["start"])
    metrics["guidance"], metrics["guidance_start"] = best
    metrics["guidance_source"] = (
        f"chosen: the lowest FD of {got['prompts']} training captions' samples to "
        f"{got['reference']} other training images among "
        + ", ".join(describe(*p) for p in candidates)
    )
    E.say(f"evaluate: guidance {describe(*best)} chosen ({metrics['guidance_source']})")
    tables[
        f"Guidance chosen for this model: {describe(*best)} ({got['prompts']} training captions, "
        f"one seed each, at each scale and start; FD to {got['reference']} other training "
        "images, lower is closer, and its ratio to the captions' own images' FD "
        f"({got['floor']:.4f}); CLIP score, higher follows the captions more)"
    ] = X.table_html(
        [
            {"guidance": f"{r['guidance']:g}",
             "unguided steps": f"first {r['start']:.0%}" if r["start"] else "none",
             "FD to training images": f"{r['fd_train']:.4f}",
             "ratio to the floor": f"{r['fd_ratio']:.2f}",
             "CLIP score": f"{r['clip_score']:.3f}",
             "chosen": "yes" if (r["guidance"], r["start"]) == best else ""}
            for r in got["table"]
        ]
    )  # fmt: skip
    return best
