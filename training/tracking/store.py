"""Where MLflow keeps runs and models.

Embedded default: SQLite at ``<repo>/mlflow.db`` with artifacts in ``<repo>/mlartifacts``;
``MLFLOW_TRACKING_URI`` points everything at a server instead.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

EXPERIMENT = "kiln"
PARENT_ENV = "KILN_PARENT_RUN_ID"


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
