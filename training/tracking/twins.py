"""A stage that made a model the registry holds already: that version, not a copy.

A stage re-runs on unchanged training whenever DVC sees a dep change that the weights
do not: an edit to code every stage imports (``training/stages.py``, the tracking code),
a rejected picture before data/clean held only the data. Training is deterministic, so
it makes the same weights, and each such run registered them again: kiln-vae v4 equal
to v3, and so on down to a kiln-text2image version equal to the ``@champion``, which the
gate then judged against itself, found no better and set aside as ``@challenger``.

The decision: the same model is the same version.

* A component (kiln-vae, kiln-clip, kiln-unet, kiln-controlnet) is its weights: a
  version whose ``kiln.weights`` (``resume.folder_fingerprint``) equals the new folder's
  is taken, and nothing is registered (``registry.ensure_registered`` already identifies
  a component's version by its weights). Its tags stay those of the run that trained
  it; this stage run is tagged ``kiln.same_weights_as``.
* The pipeline is its weights and how it is served: the component configs, tokenizer,
  scheduler and the sampler defaults evaluate chose (``kiln_sampler.json``), and the
  shipped ControlNet's settings (``served_fingerprint``, tagged ``kiln.served``). A
  version equal in both is taken, neither registered nor judged again: the gate's
  decision recorded on it stands, so a run that made the champion again says so and
  leaves it ``@champion``. Equal weights served otherwise (another guidance, another
  scheduler) are another model to serve: registered and judged, as before.
* Of several equal versions (copies registered before this), the ``@champion`` if it
  is one, else the newest. A component version without ``kiln.weights`` (registered by
  a Kiln before 2026-12-06) is hashed from its files when no tagged one matches (its
  ``@champion`` and the newest ``UNTAGGED_LOOKUPS``, each once: then it carries the
  tag). Was: never matched, so the first run after upgrading Kiln, which re-runs every
  stage (their code changed) and trains the same weights, registered kiln-vae,
  kiln-clip and kiln-unet v2 equal to v1. A pipeline version without the tags is still
  never matched (it also lacks the sampler file that serving reads now).
* A registration a stop interrupted is finished, not matched (``resume.py``).

Either way the stage says so in one line: ``kiln-vae: weights unchanged, same as v3``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from training.paths import SHIPPED_CONTROLNET
from training.tracking.resume import (
    WEIGHTS_TAG,
    folder_fingerprint,
    recorded_decision,
    unfinished,
    weights_fingerprint,
)

SERVED_TAG = "kiln.served"  # served_fingerprint of a pipeline version
SAME_TAG = "kiln.same_weights_as"  # on a stage run that made a registered version again
# untagged (pre-2026-12-06) versions a component's search hashes, besides its @champion:
# the newest few, since a retrain after an upgrade remakes a recent model; each is
# downloaded once at most (a remote registry's files), then tagged
UNTAGGED_LOOKUPS = 2
# what a shipped ControlNet is served with besides its weights: its config and detector
# settings (inference/control.py's CONTROL_FILE, not imported: it would make every
# stage's DVC deps include the inference code), not its previews or resolved params
CONTROLNET_SERVED = ("config.json", "kiln_control.json")


def served_fingerprint(pipeline_dir: Path) -> str:
    """``weights_fingerprint`` and the bytes of every other file a served pipeline reads:
    the pipeline folder's files but its weights, and the shipped ControlNet's
    ``CONTROLNET_SERVED``."""
    h = hashlib.sha256(weights_fingerprint(pipeline_dir).encode())
    shipped = pipeline_dir.parent / SHIPPED_CONTROLNET
    files = [p for p in sorted(pipeline_dir.rglob("*")) if p.suffix != ".safetensors"]
    files += [shipped / n for n in CONTROLNET_SERVED]
    for path in files:
        if path.is_file():
            h.update(path.relative_to(pipeline_dir.parent).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:32]


def twin(name: str, weights: str, served: str | None = None) -> str | None:
    """The version of ``name`` tagged with these ``weights`` (and ``served``, if given):
    the ``@champion`` if it is one of them, else the newest; None if none is."""
    from mlflow import MlflowClient

    client = MlflowClient()
    query = f"name = '{name}' and tags.`{WEIGHTS_TAG}` = '{weights}'"
    found = [
        v
        for v in client.search_model_versions(query)
        if served is None or v.tags.get(SERVED_TAG) == served
    ]
    if not found:
        return None
    numbers = sorted((str(v.version) for v in found), key=int)
    # the registered model's aliases: a search's versions carry none
    champion = str(client.get_registered_model(name).aliases.get("champion"))
    return champion if champion in numbers else numbers[-1]


def component_twin(tr, name: str, directory: Path) -> str | None:
    """The version of component ``name`` with the weights in ``directory``, said and
    tagged on the stage run ``tr``; None (register them) when none has."""
    if not any(directory.rglob("*.safetensors")):  # nothing to tell versions apart by
        return None
    weights = folder_fingerprint(directory)
    version = twin(name, weights)
    if version is None and tag_untagged(name):
        version = twin(name, weights)
    if version is not None:
        _said(tr, name, version, "not registered again")
    return version


def tag_untagged(name: str) -> int:
    """Tag with ``kiln.weights`` the versions of component ``name`` that an older Kiln
    registered without it: its ``@champion`` and the newest ``UNTAGGED_LOOKUPS``, hashed
    from their registered files (``downloads.resolve_model_dir``: the embedded store's
    are read where they lie). Returns how many were tagged; a version whose files are gone is
    left as it is."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from training.tracking.downloads import resolve_model_dir

    client = MlflowClient()
    found = client.search_model_versions(f"name = '{name}'")
    untagged = sorted((str(v.version) for v in found if WEIGHTS_TAG not in v.tags), key=int)
    if not untagged:
        return 0
    champion = str(client.get_registered_model(name).aliases.get("champion"))
    picks = {*untagged[-UNTAGGED_LOOKUPS:], *([champion] if champion in untagged else [])}
    tagged = 0
    for version in sorted(picks, key=int):
        try:
            root = resolve_model_dir(f"models:/{name}/{version}")
        except (MlflowException, OSError, ValueError):  # its files are lost: nothing to compare
            continue
        if any(root.rglob("*.safetensors")):
            client.set_model_version_tag(name, version, WEIGHTS_TAG, folder_fingerprint(root))
            tagged += 1
    return tagged


def pipeline_twin(tr, name: str, pipeline_dir: Path, metrics: dict[str, Any]) -> str | None:
    """The version of pipeline ``name`` served exactly as ``pipeline_dir``, said and
    tagged on ``tr``, its recorded gate decision put in ``metrics``; None (register and
    judge it) when none is, or when one of these weights is still to be finished."""
    from mlflow import MlflowClient

    from training.console import say

    weights = weights_fingerprint(pipeline_dir)
    if unfinished(name, weights) is not None:
        return None  # register_text2image finishes that one
    version = twin(name, weights, served_fingerprint(pipeline_dir))
    if version is None:
        same = twin(name, weights)
        if same is not None:
            say(
                f"{name}: weights unchanged, same as v{same}, but served with other "
                "settings (sampler, guidance or configs): a new version for the gate"
            )
        return None
    mv = MlflowClient().get_model_version(name, version)
    decided = recorded_decision(mv) or {}
    metrics.update(decided)
    metrics["same_weights_as"] = version
    held = ", ".join(f"@{a}" for a in sorted(mv.aliases or [])) or "no alias"
    _said(tr, name, version, f"{held}; not registered nor judged again")
    return version


def _said(tr, name: str, version: str, what: str) -> None:
    from training.console import say

    say(f"{name}: weights unchanged, same as v{version} ({what})")
    tr.mlflow.set_tag(SAME_TAG, version)
