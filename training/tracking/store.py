"""Where MLflow keeps runs and models.

Embedded default: SQLite at ``<repo>/mlflow.db`` with artifacts in ``<repo>/mlartifacts``;
``MLFLOW_TRACKING_URI`` points everything at a server instead.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from training.stages import PREFIX

EXPERIMENT = f"{PREFIX}kiln"  # one experiment a project (training/stages.py: PREFIX)
PARENT_ENV = "KILN_PARENT_RUN_ID"
# MLflow's error codes for "no such registered model" and "no such alias": only these
# mean there is no champion; any other error is the registry failing to answer
NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def _quiet() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def tracking_uri(root: Path | None = None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = (root or Path.cwd()).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def setup(root: Path | None = None):
    """Point mlflow at the store and make sure the experiment exists; returns mlflow."""
    _quiet()
    import mlflow

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        location = None
        if uri.startswith("sqlite:"):  # keep artifacts beside the DB, not in the cwd
            location = ((root or Path.cwd()).resolve() / "mlartifacts").as_uri()
        with contextlib.suppress(Exception):  # a concurrent creator may win the race
            mlflow.create_experiment(EXPERIMENT, artifact_location=location)
    mlflow.set_experiment(EXPERIMENT)
    return mlflow


def check_reachable(timeout_s: float = 5.0) -> None:
    """Raise ``ConnectionError`` now if the tracking server does not answer, instead of
    MLflow's minutes of retries followed by an error deep inside a stage. A local store
    (SQLite, a folder) is always reachable."""
    import urllib.error
    import urllib.request

    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):  # noqa: S310
            return
    except urllib.error.HTTPError:
        return  # it answered (a proxy's 401/404 is an answer; auth errors come later)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(
            f"the MLflow server at {uri} (MLFLOW_TRACKING_URI) cannot be reached: {reason}"
        ) from None
