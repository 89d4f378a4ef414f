"""Registered component models a continuing pipeline builds on (``phases/reuse.py``):
fetching one by reference, and crowning those a champion pipeline was built from."""

from __future__ import annotations

import json
from pathlib import Path

from training.paths import METRICS
from training.stages import PIPELINE_MODEL, STAGES
from training.tracking.registry import model_version, resolve_model_dir


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
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None  # no such model, or no such alias
        raise ConnectionError(f"the registry did not answer for {name}@champion: {exc}") from None


def crown(root: Path = Path(".")) -> dict[str, str]:
    """A new champion pipeline makes champions of the components it was built from (the
    versions its stages registered or reused, from their metrics), so
    ``models:/kiln-vae@champion`` is the champion's VAE: what a continuing run reuses.
    A version this registry does not hold (the stage ran against another registry, or
    this one was emptied since; a single stage run by hand does not re-register its
    inputs as ``kiln run`` does) is named and left alone: the pipeline is registered
    either way."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from training.console import say

    crowned = {}
    for s in STAGES:
        metrics = root / METRICS / f"{s.name}.json"
        if s.model in (None, PIPELINE_MODEL) or not metrics.is_file():
            continue
        version = json.loads(metrics.read_text()).get("registered_version")
        if not version:
            continue
        try:
            MlflowClient().set_registered_model_alias(s.model, "champion", str(version))
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            say(
                f"{s.model} v{version} (from {metrics}) is not in this registry: not made "
                "champion; `kiln run` registers what a stage made again"
            )
            continue
        crowned[s.model] = str(version)
    return crowned
