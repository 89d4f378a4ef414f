"""Attribute accuracy of the built-in sets: the oracle reads each sample's attributes
(shape, colour, size, position; or the digit) and compares them with its prompt's ground
truth, per attribute and all at once, on seen and on held-out compositions."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from training.evaluation.metrics.base import Samples


def score(s: Samples) -> dict[str, float]:
    if s.oracle is None:  # user data has no ground truth to read
        return {}
    hits: dict[str, list[float]] = defaultdict(list)
    for img, truth in zip(s.images, s.truths, strict=True):
        group = "held_out" if truth.held_out else "seen"
        for attr, ok in s.oracle.score(img, truth.truth).items():
            hits[f"acc_{attr}"].append(float(ok))
            hits[f"acc_{attr}_{group}"].append(float(ok))
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}
