"""Attribute accuracy of the built-in sets: the oracle reads each sample's attributes
(shape, colour, size, position; or the digit) and compares them with its prompt's ground
truth, per attribute and all at once, on seen and on held-out compositions."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from training.config import ORACLE_ACCURACIES
from training.evaluation.metrics.base import Samples


def score(s: Samples) -> dict[str, float | str]:
    """The accuracies, and for a group no sample was drawn from (``evaluate.max_prompts``
    of 12 keeps no held-out shapes prompt) ``acc_<attr>_<group>_skipped`` with the
    reason: the gate may be set to one of them, and a metric that is simply absent
    stopped the run after its version was registered (was: ``is not a metric of this
    run``, a version with no alias on every try)."""
    if s.oracle is None:  # user data has no ground truth to read
        return {}
    hits: dict[str, list[float]] = defaultdict(list)
    for img, truth in zip(s.images, s.truths, strict=True):
        group = "held_out" if truth.held_out else "seen"
        for attr, ok in s.oracle.score(img, truth.truth).items():
            hits[f"acc_{attr}"].append(float(ok))
            hits[f"acc_{attr}_{group}"].append(float(ok))
    out: dict[str, float | str] = {k: float(np.mean(v)) for k, v in sorted(hits.items())}
    attrs, groups = ORACLE_ACCURACIES.get(s.params.oracle() or "", ((), ()))
    for g in groups:
        missing = [f"acc_{a}_{g}" for a in attrs if f"acc_{a}_{g}" not in out]
        why = (
            f"no {g.replace('_', '-')} prompt among the {len(s.images)} samples "
            f"(evaluate.max_prompts {s.params.evaluate.max_prompts}); raise it or gate on "
            "another accuracy"
        )
        out.update({f"{k}_skipped": why for k in missing})
    return out
