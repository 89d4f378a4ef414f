"""Finishing a ``kiln-text2image`` registration that a stop interrupted.

The evaluate stage registers its pipeline, the gate judges it (records its decision on
the version, then moves ``@champion`` or ``@challenger`` and crowns a winner's
components), then the version gets its lineage tags and its model card. A stop anywhere
in between (SIGKILL, Ctrl-C, a lost machine, a card upload that failed) used to leave a
champion without card or lineage, and the re-run registered the same weights again: the
gate compared them with themselves, and the copy waited as ``@challenger``.

The decision: a registration is resumed, never repeated.

* The version is created with all its tags at once (``registry.register_text2image``),
  among them ``kiln.weights``: a hash of the pipeline's tensors (``weights_fingerprint``),
  so whatever stops after it exists leaves a version a re-run can find.
* ``kiln.finished_by`` names the stage run that published the card, the last step
  (``gate.publish_card``). Until that run has ended FINISHED, the registration is
  unfinished (``unfinished``), and a re-run of evaluate for the same weights takes that
  version instead of registering another:

  - stopped before the gate decided (no ``gate_decision`` tag): the re-run's metrics
    replace its metric tags and the gate judges it now, as the first run would have;
  - stopped after the decision: the decision stands (``recorded_decision``; the gate never
    judges a version twice, ``gate.promote``). A winner whose alias move or component
    crowning did not happen gets them, unless ``@champion`` moved since; a loser is never
    crowned. The re-run re-scores the champion the version was judged against
    (``evaluation/evaluate.py``, ``champion_scores``), so its card compares the same two
    versions as the decision did, not the version with itself;
  - lineage tags and card are then written (again), and ``kiln.finished_by`` is set.

* A finished registration is never resumed: evaluating the same weights again after a
  finished stage (other evaluation code or settings) registers a new version, as before.
  One window stays: a stop after the stage's run ended FINISHED but before its metrics
  file or DVC's lock was written registers the weights again on the re-run, a copy the
  gate keeps as ``@challenger``; the first version lacks nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.paths import SHIPPED_CONTROLNET
from training.tracking.store import NOT_FOUND

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

WEIGHTS_TAG = "kiln.weights"  # weights_fingerprint / folder_fingerprint of a version
FINISHED_TAG = "kiln.finished_by"  # the stage run that published the version's card


def weights_fingerprint(pipeline_dir: Path) -> str:
    """A hash of the tensors (names, dtypes, shapes, values) of a pipeline folder's
    safetensors files and of the ControlNet shipped beside it: the trained weights, not
    the evaluation's choices (the sampler defaults, the scheduler) nor how a file orders
    them or what metadata it carries."""
    shipped = pipeline_dir.parent / SHIPPED_CONTROLNET
    files = [*sorted(pipeline_dir.rglob("*.safetensors")), *sorted(shipped.rglob("*.safetensors"))]
    return _tensors_hash(files, pipeline_dir.parent)


def folder_fingerprint(directory: Path) -> str:
    """``weights_fingerprint`` of a component folder (``kiln-vae``, ``kiln-clip``...):
    its own safetensors only, so a VAE's does not change with the ControlNet that
    ``data/models`` holds beside it. ``registry.register_dir`` tags each version with it,
    which is how ``registry.ensure_registered`` knows a stage run by hand registered
    these weights already."""
    return _tensors_hash(sorted(directory.rglob("*.safetensors")), directory)


def _tensors_hash(files: list[Path], base: Path) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(base).as_posix().encode())
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            for key in sorted(header):
                t = header[key]
                h.update(json.dumps([key, t["dtype"], t["shape"]]).encode())
                start, end = t["data_offsets"]
                f.seek(8 + size + start)
                left = end - start
                while left:
                    chunk = f.read(min(left, 1 << 24))
                    if not chunk:
                        raise ValueError(f"{path}: truncated safetensors file")
                    h.update(chunk)
                    left -= len(chunk)
    return h.hexdigest()[:32]


def unfinished(name: str, fingerprint: str) -> ModelVersion | None:
    """The last version of ``name`` registered from these weights if its registration did
    not finish (``FINISHED_TAG`` names no run that ended FINISHED), else None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from training.tracking.store import check_reachable, setup

    check_reachable()
    setup()
    client = MlflowClient()
    query = f"name = '{name}' and tags.`{WEIGHTS_TAG}` = '{fingerprint}'"
    found = sorted(client.search_model_versions(query), key=lambda v: -int(v.version))
    if not found:
        return None
    last, run_id = found[0], found[0].tags.get(FINISHED_TAG)
    if run_id:
        try:
            if client.get_run(run_id).info.status == "FINISHED":
                return None
        except MlflowException as exc:
            if exc.error_code not in NOT_FOUND:  # a deleted run finished nothing
                raise
    return last


# the decision's numbers; its other tags are words, version numbers or "None"
_NUMBERS = ("gate_value", "gate_champion_value")


def recorded_decision(version: ModelVersion) -> dict[str, Any] | None:
    """The gate's decision as recorded on a registry version (its ``gate_*`` tags, what
    ``gate.promote`` returned then), None when the gate has not decided on it."""
    tags = version.tags
    if "gate_decision" not in tags:
        return None
    return {
        k: None if v == "None" else float(v) if k in _NUMBERS else v
        for k, v in sorted(tags.items())
        if k.startswith("gate_")
    }


def resume_registration(tr, name: str, version: ModelVersion, tags: dict[str, str]) -> str:
    """Take over ``version`` (``unfinished``) for this stage run, which evaluated the same
    weights and would have registered them with ``tags``. Not judged yet: its metric tags
    become this run's (what the gate will read; the ones this run lacks are removed).
    Judged: its tags stay what the decision was made on."""
    from mlflow import MlflowClient

    from training.console import say

    client = MlflowClient()
    number = str(version.version)
    decided = recorded_decision(version)
    if decided is None:
        for k in version.tags:
            if k.startswith("metric.") and k not in tags:
                client.delete_model_version_tag(name, number, k)
        for k, v in tags.items():
            client.set_model_version_tag(name, number, k, v)
    how = "not judged yet" if decided is None else f"judged @{decided['gate_decision']}"
    say(
        f"{name} v{number} holds these weights and its registration did not finish "
        f"(run {version.run_id}, {how}): finishing it instead of registering them again"
    )
    tr.mlflow.set_tag("kiln.resumed_version", number)
    return number
