"""Memorisation: does the model hand back copies of its training images?

Each generated sample's nearest training image is found in pixel space (RMS distance
of [0, 1] RGB values, at the training resolution), and so is each real val image's.
A sample within ``evaluate.copy_distance`` of a training image counts as a copy. Real
val images were never trained on, so their own rate of landing that close to a training
image (near-duplicates across the split, common in curated and synthetic sets) is the
rate a model that does not memorise should show: ``copies_frac`` is to be read against
``copies_frac_val``. The median nearest distances tell the same story without a
threshold: samples much closer to the training set than new real images are is
memorisation. The flagged samples are shown beside their training image in the report.

The search is exact and streams the training split in chunks; on a large split it
covers the first ``evaluate.copy_search_samples`` training images (canonical order),
and says so.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from training.evaluation.metrics.base import Samples

SHOW = 16  # flagged pairs kept for the report's figure


def _pixels(images: list, size: int) -> torch.Tensor:
    from PIL import Image

    arr = np.stack(
        [
            np.asarray(
                i.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
                if i.size != (size, size)
                else i.convert("RGB"),
                dtype=np.uint8,
            )
            for i in images
        ]
    )
    return torch.from_numpy(arr).float().div(255).flatten(1)


def nearest(queries: torch.Tensor, chunks) -> tuple[torch.Tensor, torch.Tensor, int]:
    """RMS distance and index of each query's nearest reference row, over ``chunks``
    of ``[n, D]`` references, and how many references were searched."""
    best = torch.full((len(queries),), float("inf"))
    where = torch.zeros(len(queries), dtype=torch.long)
    seen = 0
    for ref in chunks:
        d = torch.cdist(queries, ref).div(queries.shape[1] ** 0.5)
        v, i = d.min(1)
        better = v < best
        best = torch.where(better, v, best)
        where = torch.where(better, i + seen, where)
        seen += len(ref)
    return best, where, seen


def score(s: Samples) -> dict:
    from training.engine import loaders
    from training.engine.images import decode_image
    from training.intake import shards

    c = s.params.evaluate
    size = s.params.ingest.image_size
    val = [
        r.image()
        for r in itertools.islice(shards.read(shards.shard_paths(s.clean_dir / "val")), 512)
    ]
    queries = (
        torch.cat([_pixels(s.images, size), _pixels(val, size)]) if val else _pixels(s.images, size)
    )
    train = loaders.Split(
        str(s.clean_dir / "train"),
        lambda sample: decode_image(sample, size),
        lambda px: {"px": np.stack(px)},
    )
    try:
        chunks = (
            b["px"].float().div(255).flatten(1) for b in train.scan(2048, c.copy_search_samples)
        )
        dist, idx, searched = nearest(queries, chunks)
        n = len(s.images)
        gen, real = dist[:n], dist[n:]
        copies = (gen < c.copy_distance).nonzero().flatten().tolist()
        flagged = sorted(copies, key=lambda i: float(gen[i]))[:SHOW]
        pairs = []
        if flagged:
            train_px = train.take(idx[flagged].numpy())["px"]
            pairs = [(i, train_px[k].numpy(), float(gen[i])) for k, i in enumerate(flagged)]
    finally:
        train.close()
    out: dict = {
        "copies": len(copies),
        "copies_frac": len(copies) / max(1, n),
        "nn_train_dist_median": float(gen.median()),
        "copy_search_samples": searched,
        "memorisation_pairs": pairs,  # not a metric: the report's figure
    }
    if len(real):
        out["copies_frac_val"] = float((real < c.copy_distance).float().mean())
        out["nn_train_dist_median_val"] = float(real.median())
    else:
        out["copies_frac_val_skipped"] = "no val images to compare with"
    if searched < len(train):
        out["copy_search_note"] = f"searched the first {searched} of {len(train)} training images"
    return out
