"""The evaluation's metrics registry.

Each metric is one module with ``score(samples) -> {name: value}``; ``METRICS`` lists
them in report order. A metric that cannot be computed on this data returns a
``<name>_skipped`` reason instead of a number (the report shows it; MLflow gets numbers
only). Adding a metric: one module here plus one entry below.
"""

from __future__ import annotations

from collections.abc import Callable

from training.evaluation.metrics import (
    clip_score,
    distribution,
    memorisation,
    oracle_accuracy,
    reconstruction,
)
from training.evaluation.metrics.base import Samples

METRICS: dict[str, Callable[[Samples], dict]] = {
    "oracle_accuracy": oracle_accuracy.score,
    "clip_score": clip_score.score,
    "reconstruction": reconstruction.score,
    "distribution": distribution.score,
    "memorisation": memorisation.score,
}


def score_all(samples: Samples) -> dict:
    """Every registered metric on one set of samples."""
    out: dict = {}
    for fn in METRICS.values():
        out.update(fn(samples))
    return out


__all__ = ["METRICS", "Samples", "score_all"]
