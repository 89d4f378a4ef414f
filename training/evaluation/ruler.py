"""A fixed ruler for data without an oracle: one CLIP that every run on a collection is
measured with.

FD and CMMD are distances in a CLIP's image space. Measured with the CLIP a run trained,
they move with the ruler as well as with the samples: each run's CLIP prefers the
samples of the U-Net trained on its own text states (benchmarks/RESULTS.md, "measured in
each other's CLIP"), so two runs' ``cmmd_clip`` cannot be compared, and a gate on them
grades a model with its own teacher. ``kiln ruler`` trains one CLIP on the collection,
once: its own pinned seed (not the pipeline's), by default twice the profile's CLIP
steps, and never the CLIP of a pipeline run. It registers it as ``kiln-ruler``.
``evaluate.ruler`` names it (``models:/kiln-ruler/1``, or a directory holding a
``CLIPModel`` and its tokenizer); evaluate then measures ``fd_clip``, ``cmmd_clip``,
their real-halves floors and ``fd_clip_ratio`` with it, for the new version and the
re-scored champion alike. The ruler stays put while the collection grows, so distances
of runs months apart are in one space.

This module is what evaluate needs (which ruler, checked); training one is
``training/phases/ruler.py``, so a change there re-runs no evaluation.
"""

from __future__ import annotations

from pathlib import Path

from training.config import Params
from training.tracking.registry import RULER_MODEL  # noqa: F401 (kiln-ruler)

# The ruler's seed: pinned, and not params.yaml's default 0, so that a ruler is never the
# very CLIP a default pipeline run trains on the same data.
DEFAULT_SEED = 1


def resolve(params: Params) -> tuple[Path, str] | None:
    """(directory, what it is: ``models:/name/version``, or the directory and its weights'
    digest) of ``evaluate.ruler``, checked to be a CLIP with its tokenizer for this
    profile's image size; None when no ruler is set. Raises ``ReuseError`` (a
    ``ValueError``) for anything else and ``ConnectionError`` when the registry cannot be
    reached."""
    from training.phases.reuse import ReuseError, check
    from training.phases.reuse import resolve as find

    ref = params.evaluate.ruler
    if not ref:
        return None
    try:
        directory, version = find(ref)
        check("train_clip", ref, directory, params)
    except ReuseError as exc:
        raise ReuseError(f"evaluate.ruler: {exc}") from None
    if version:  # registry versions never change
        return directory, f"models:/{version}"
    from training.intake.index import file_sha256

    # a directory may be retrained in place: its weights' digest says which CLIP it was
    digest = file_sha256(directory / "model.safetensors")[:16]
    return directory, f"{directory} (weights sha256 {digest})"
