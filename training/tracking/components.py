"""Registered component models a continuing pipeline builds on (``phases/reuse.py``):
fetching one by reference, and crowning those a champion pipeline was built from."""

from __future__ import annotations

import json
from pathlib import Path

from training.paths import METRICS
from training.stages import PIPELINE_MODEL, STAGES
from training.tracking.registry import model_version, resolve_model_dir
from training.tracking.store import NOT_FOUND


def fetch(ref: str) -> tuple[Path, str]:
    """(local directory, ``name/version``) of ``models:/name@alias`` or
    ``models:/name/version``. Raises ``LookupError`` for what the registry does not
    have, ``ConnectionError`` when it cannot be reached."""
    from mlflow.exceptions import MlflowException

    from training.tracking.store import check_reachable

    check_reachable()  # seconds, not MLflow's minutes of retries
    try:
        name_version = model_version(ref)
        return resolve_model_dir(f"models:/{name_version}"), name_version
    except MlflowException as exc:
        text = str(exc)
        first = text.strip().splitlines()[0][:300]
        if "Max retries exceeded" in text or "Connection refused" in text:
            raise ConnectionError(f"the registry cannot be reached for {ref}: {first}") from None
        raise LookupError(f"{ref}: not in the registry ({first})") from None
    except (ValueError, OSError) as exc:  # no versions at all, a lost artifact store
        raise LookupError(f"{ref}: {exc}") from None


def champion(name: str) -> str | None:
    """The version ``name@champion`` points at, None when there is none yet. Unlike
    ``registry.champion_version`` a registry that cannot be reached is an error
    (``ConnectionError``), never "no champion": continuing from nothing would silently
    train from scratch."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from training.tracking.store import check_reachable, setup

    check_reachable()
    setup()
    try:
        return str(MlflowClient().get_model_version_by_alias(name, "champion").version)
    except MlflowException as exc:
        if exc.error_code in NOT_FOUND:
            return None  # no such model, or no such alias
        raise ConnectionError(f"the registry did not answer for {name}@champion: {exc}") from None


def built_from(root: Path = Path(".")) -> dict[str, str]:
    """``{model: version}`` of the components this checkout's pipeline was built from:
    the versions its stages registered or reused (``registered_version`` in their
    metrics). The pipeline version is tagged with them, and whatever makes it champion
    makes them champions too (``gate.crown_components``), so
    ``models:/kiln-vae@champion`` is the champion's VAE: what a continuing run reuses."""
    parts = {}
    for s in STAGES:
        metrics = root / METRICS / f"{s.name}.json"
        if s.model in (None, PIPELINE_MODEL) or not metrics.is_file():
            continue
        version = json.loads(metrics.read_text()).get("registered_version")
        if version:
            parts[s.model] = in_this_registry(s.name, s.model, root, str(version))
    return parts


def in_this_registry(stage: str, model: str, root: Path, named: str) -> str:
    """The version of this registry holding ``stage``'s output weights. ``named`` (the
    stage's metrics) is the number where the stage ran: after DVC restored the stage
    onto a new MLflow server, another registry's, while the flow registered the same
    weights here under its own (was: the pipeline tagged with the old number, so a
    promotion crowned an unrelated version or none, and ``mode: continue`` built on it
    or stopped). ``named`` where no version carries the weights' fingerprint."""
    from mlflow import MlflowClient

    from training.tracking.registry import same_weights

    versions = MlflowClient().search_model_versions(f"name = '{model}'")
    newest_first = sorted(versions, key=lambda v: -int(v.version))
    return same_weights(newest_first, stage, root, named) or named
