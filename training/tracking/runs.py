"""MLflow runs: one per stage, nested under the pipeline's run when ``KILN_PARENT_RUN_ID``
is set (the Prefect flow sets it). Each gets the stage's params, per-step metrics, the
resolved config, the git commit and the DVC hashes of its inputs as tags. A run whose
process died is closed by the next pipeline (``close_orphaned_runs``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from training.intake.canonical import public_source
from training.tracking.lineage import data_tags, dvc_lineage, flatten, git_commit
from training.tracking.store import EXPERIMENT, PARENT_ENV, setup


class StageRun:
    """What a phase sees of tracking: metrics and images (``tracker.MetricLogger``)."""

    def __init__(self, mlflow, run):
        self.mlflow, self.run = mlflow, run

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        self.mlflow.log_metrics(numeric, step=step)

    def log_image(self, path: str | Path, artifact_dir: str = "images") -> None:
        self.mlflow.log_artifact(str(path), artifact_path=artifact_dir)

    def log_artifacts(self, directory: str | Path, artifact_path: str) -> None:
        self.mlflow.log_artifacts(str(directory), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.mlflow.set_tags(tags)

    def log_params(self, params: dict[str, Any]) -> None:
        """Params a phase settles as it runs (train_unet's fine-tuning steps and rate),
        under their own names: MLflow never lets a logged param change."""
        self.mlflow.log_params(loggable(params))


def loggable(params: dict[str, Any]) -> dict[str, str]:
    """Params as MLflow stores them: text, cut at its 500-character limit (a long source
    path or list would fail the whole call)."""
    return {k: str(public_source(v) if k == "source" else v)[:500] for k, v in params.items()}


def run_params(params_dict: dict[str, Any]) -> dict[str, Any]:
    """What every Kiln run records beside its own section: the profile, the seed, and
    what it trains on and from (``mode``: scratch or continuing from the champion; the
    dataset kind and its source), so runs of two collections or modes are told apart."""
    ingest = params_dict.get("ingest", {})
    return {
        "profile": params_dict["profile"],
        "seed": params_dict["seed"],
        "mode": params_dict.get("mode", "scratch"),
        "dataset": ingest.get("dataset"),
        "source": ingest.get("source"),  # logged through loggable: without a signature
    }


def process_tags() -> dict[str, str]:
    """Who is running this MLflow run: lets a later pipeline tell a run whose process
    died (SIGKILL, a lost machine) from one still going (``close_orphaned_runs``)."""
    import socket

    return {"kiln.host": socket.gethostname(), "kiln.pid": str(os.getpid())}


@contextlib.contextmanager
def _killed_on_interrupt(mlflow) -> Iterator[None]:
    """Ctrl-C ends the active run as KILLED, not FAILED: nothing was wrong with it."""
    try:
        yield
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            mlflow.end_run(status="KILLED")
        raise


def _process_started(pid: int) -> float | None:
    """Start time (epoch seconds) of a live process, None if there is none."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.AccessDenied:  # someone else's live process (hidepid /proc)
        return 0.0
    except psutil.Error:  # NoSuchProcess, ZombieProcess
        return None


def close_orphaned_runs(root: Path | None = None) -> list[str]:
    """Mark KILLED the RUNNING Kiln runs of this host whose process is gone.

    A SIGKILLed pipeline (or a lost stage process) cannot end its own MLflow runs; the
    next pipeline in the same checkout does it, under the run lock. Runs of other hosts
    (a GPU worker, a colleague on a shared server) are left alone: their processes
    cannot be checked from here. A pid reused by a newer process does not count as the
    run's (the process must have started before the run)."""
    import socket

    from mlflow import MlflowClient

    mlflow = setup(root)
    host = socket.gethostname()
    runs = mlflow.search_runs(
        experiment_names=[EXPERIMENT],
        output_format="list",
        filter_string=f"attributes.status = 'RUNNING' and tags.`kiln.host` = '{host}'",
    )
    client, closed = MlflowClient(), []
    for run in runs:
        pid = run.data.tags.get("kiln.pid", "")
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        started = _process_started(int(pid))
        if started is not None and started <= run.info.start_time / 1000 + 1:
            continue  # its process is still alive
        client.set_tag(run.info.run_id, "kiln.closed_by", "next pipeline: its process was gone")
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    return closed


@contextlib.contextmanager
def stage_run(
    stage: str, params_dict: dict[str, Any], resolved_config: Path, root: Path | None = None
) -> Iterator[StageRun]:
    """An MLflow run for one stage, nested under the pipeline run if there is one."""
    mlflow = setup(root)
    parent = os.environ.get(PARENT_ENV) or None
    tags = {
        "kiln.stage": stage,
        "git.commit": git_commit(root),
        **process_tags(),
        **dvc_lineage(stage, root),
        **data_tags(params_dict),  # copied onto the version it registers (tag_lineage)
    }
    if parent:
        tags["kiln.pipeline_run_id"] = parent
    start = mlflow.start_run(run_name=stage, nested=bool(parent), parent_run_id=parent, tags=tags)
    with start as run, _killed_on_interrupt(mlflow):
        section = params_dict.get(stage, {})
        # ingest's own dataset and source are the same values under the same names
        flat = {**run_params(params_dict), **flatten(section if isinstance(section, dict) else {})}
        mlflow.log_params(loggable(flat))
        mlflow.log_artifact(str(resolved_config), artifact_path="config")
        yield StageRun(mlflow, mlflow.get_run(run.info.run_id))


@contextlib.contextmanager
def pipeline_run(params_dict: dict[str, Any], root: Path | None = None) -> Iterator[str]:
    """The parent run of one pipeline execution; yields its id (also exported in env)."""
    mlflow = setup(root)
    tags = {"kiln.stage": "pipeline", "git.commit": git_commit(root), **process_tags()}
    with mlflow.start_run(run_name="kiln-pipeline", tags=tags) as run, _killed_on_interrupt(mlflow):
        mlflow.log_params(loggable(run_params(params_dict)))
        os.environ[PARENT_ENV] = run.info.run_id
        try:
            yield run.info.run_id
        finally:
            os.environ.pop(PARENT_ENV, None)


def log_pipeline_summary(summary: dict[str, Any], markdown: str) -> None:
    import mlflow

    mlflow.log_metrics(
        {k: float(v) for k, v in flatten(summary).items() if isinstance(v, int | float)}
    )
    mlflow.log_text(markdown, "summary.md")
