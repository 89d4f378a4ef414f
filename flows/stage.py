"""The ``kiln-stage`` flow: one DVC stage on a worker (the gpu pool, say).

It shares nothing with the caller but the Prefect API, the MLflow server and the DVC
remote: it takes the caller's params and dvc.lock, pulls the outs of the stages it
reads and its own (an unchanged stage is then skipped, as in the caller), runs the
stage, pushes its outs, and hands back the stage's dvc.lock entry and metrics as the
``kiln-stage-result`` artifact (``run_remote`` on the caller's side).
"""

from __future__ import annotations

import json
import os

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.tasks import (
    ROOT,
    StageFailed,
    _dvc_cmd,
    _retryable,
    _set_params,
    refuse_other_project,
    retries,
    run_local,
)
from training.paths import METRICS
from training.stages import BY_NAME as STAGE_TABLE

RESULT_KEY = "kiln-stage-result"  # the artifact a remote stage hands back


def _dvc_yaml() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _lock() -> dict:
    import yaml

    path = ROOT / "dvc.lock"
    return yaml.safe_load(path.read_text()) if path.is_file() else {"schema": "2.0", "stages": {}}


def _write_lock(lock: dict) -> None:
    import yaml

    (ROOT / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))


def upstream(stage: str) -> list[str]:
    """The stages whose outs ``stage`` reads (its data deps), from dvc.yaml."""
    stages = _dvc_yaml()
    made_by = {
        next(iter(out)) if isinstance(out, dict) else out: name  # `- path: {persist: true}`
        for name, st in stages.items()
        for out in st.get("outs", [])
    }
    return [made_by[d] for d in stages[stage].get("deps", []) if d in made_by]


@flow(name="kiln-stage", log_prints=True)
def kiln_stage(
    stage: str,
    params_yaml: str | None = None,
    lock: dict | None = None,
    pipeline_run_id: str | None = None,
    profile: str | None = None,
    dataset: str | None = None,
    source: str | None = None,
    metrics: dict[str, str] | None = None,
) -> dict:
    """Run one DVC stage on this worker: take the caller's params and dvc.lock (when
    kiln-pipeline sends it; by hand, the checkout's own, with ``profile``/``dataset``/
    ``source`` applied), ``dvc pull`` the outs of the stages it reads, run it,
    ``dvc push`` its outs, and publish its dvc.lock entry and metrics as the
    ``kiln-stage-result`` artifact for the caller. The stage runs as it would in
    kiln-pipeline (``run_local``): ingest after the source probe, with its retries.
    ``metrics``: the caller's
    ``data/metrics/<stage>.json`` texts, which DVC does not carry (``cache: false``) and
    a stage reads of earlier ones (ingest's row counts in the lineage tags)."""
    from training import runlock

    try:
        refuse_other_project()
    except StageFailed as exc:  # said in the caller's result, not only this worker's log
        _publish({"stage": stage, "failed": str(exc)})
        raise
    stages = _dvc_yaml()
    if stage not in stages:
        raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(stages)})")
    try:
        with runlock.pipeline_lock(f"kiln-stage {stage}", ROOT):
            if metrics is not None:
                _take_metrics(stage, metrics)
            return _stage_here(stage, params_yaml, lock, pipeline_run_id, profile, dataset, source)
    except runlock.PipelineBusy as exc:
        # was: the caller read only "ended Failed", the reason in this worker's log
        _publish({"stage": stage, "failed": f"this worker's checkout is busy: {exc} {BUSY_HINT}"})
        raise


# a worker runs one flow at a time in its checkout (`--limit 1`): a second stage then
# waits in the pool's queue instead of failing on the checkout's lock
BUSY_HINT = "Start each pool's workers with --limit 1 (README, 'Running at scale')."


def _take_metrics(stage: str, metrics: dict[str, str]) -> None:
    """The caller's metrics files in place of this checkout's, for every stage but the
    one about to run: a file the caller has not is removed, so nothing from an earlier
    run here is read as this run's (was: the worker's stale ingest.json tagged the U-Net
    with another run's row counts)."""
    for name in STAGE_TABLE:
        path = ROOT / METRICS / f"{name}.json"
        if name == stage:
            continue
        if name in metrics:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(metrics[name])
        else:
            path.unlink(missing_ok=True)


def fetch(stage: str) -> None:
    """``dvc pull`` what ``stage`` reads and its own outs as the lock names them. With
    its outs here, DVC finds an unchanged stage up to date and skips it (was: only a
    persistent stage's were pulled, so a fresh worker, as the gpu pools in infra/ start,
    trained the VAE, CLIP and U-Net again every run and registered each again); a
    persistent stage builds on them (data/latents: rows it need not encode)."""
    deps = upstream(stage)
    if deps:
        _dvc_cmd("pull", *deps, what=f"dvc pull of {', '.join(deps)}")
    if stage in _lock()["stages"]:  # outs the remote lacks: the stage makes them
        _dvc_cmd("pull", "--allow-missing", stage, what=f"dvc pull of {stage}'s last outs")


def _stage_here(
    stage: str,
    params_yaml: str | None,
    lock: dict | None,
    pipeline_run_id: str | None,
    profile: str | None,
    dataset: str | None,
    source: str | None,
) -> dict:
    from training import tracking

    if params_yaml is not None:
        (ROOT / "params.yaml").write_text(params_yaml)
    _set_params(profile, dataset, source)
    if lock is not None:
        _write_lock(lock)
    if pipeline_run_id:  # nest the stage's MLflow run under the caller's pipeline run
        os.environ[tracking.PARENT_ENV] = pipeline_run_id
    fetch(stage)
    try:
        run_local(stage)
    except StageFailed as exc:
        # it ran, with its own retries, and failed: the caller must not run it again
        _publish({"stage": stage, "failed": str(exc)})
        raise
    _dvc_cmd("push", stage, what=f"dvc push of {stage}")
    metrics = ROOT / METRICS / f"{stage}.json"
    result = {
        "stage": stage,
        "lock": _lock()["stages"][stage],
        "metrics": metrics.read_text() if metrics.is_file() else None,
    }
    _publish(result)
    return result


def _publish(result: dict) -> None:
    """Hand ``result`` to the caller as this flow run's ``kiln-stage-result`` artifact:
    the stage's dvc.lock entry and metrics, or ``failed``, its last error."""
    create_markdown_artifact(
        key=RESULT_KEY,
        markdown=f"```json\n{json.dumps(result, indent=1)}\n```",
        description=f"the result of {result['stage']}",
    )


def _stage_result(flow_run_id) -> dict | None:
    """The ``kiln-stage-result`` artifact of a remote stage's flow run (None: it left
    none, having died or failed before its stage ended)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                key=ArtifactFilterKey(any_=[RESULT_KEY]),
            )
        )
    if not found:
        return None
    text = found[0].data
    return json.loads(text[text.index("{") : text.rindex("}") + 1])


def run_remote(stage: str, deployment: str, done: list[str], pipeline_run_id: str) -> None:
    """Run ``stage`` on the deployment's pool, exchanging data through the DVC remote."""
    if done:
        _dvc_cmd("push", *done, what=f"dvc push of {', '.join(done)}")
    parameters = {
        "stage": stage,
        "params_yaml": (ROOT / "params.yaml").read_text(),
        "lock": _lock(),
        "pipeline_run_id": pipeline_run_id,
        "metrics": {
            name: path.read_text()
            for name in STAGE_TABLE
            if (path := ROOT / METRICS / f"{name}.json").is_file()
        },
    }
    result = remote_stage_task.with_options(name=stage, retries=retries(stage))(
        stage, deployment, parameters
    )
    lock = _lock()
    lock.setdefault("stages", {})[stage] = result["lock"]
    _write_lock(lock)
    if result["metrics"] is not None:
        path = ROOT / METRICS / f"{stage}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(result["metrics"])
    _dvc_cmd("pull", stage, what=f"dvc pull of {stage}")


@task(name="remote-stage", retry_delay_seconds=10, retry_condition_fn=_retryable)
def remote_stage_task(stage: str, deployment: str, parameters: dict) -> dict:
    """One flow run of the deployment; its ``kiln-stage-result``. Retried (``retries``,
    as the stage is in this process) when the run ended without its stage's verdict: a
    lost worker or pod, the flow process killed, a failed pull or push. The re-run
    resumes from whatever checkpoint that worker's checkout holds. A stage that ran
    and failed had its retries on the worker and is not run again; nor is a cancelled
    run."""
    from prefect.deployments import run_deployment

    get_run_logger().info("%s -> deployment %s", stage, deployment)
    run = run_deployment(deployment, parameters=parameters, flow_run_name=stage, timeout=None)
    result = _stage_result(run.id)
    if run.state is not None and run.state.is_completed():
        if result is None:
            msg = f"flow run {run.id} left no {RESULT_KEY} artifact"
            raise StageFailed(msg, retry=False, stage=stage)
        return result
    ended = run.state.name if run.state else "unknown"
    if result is not None and "failed" in result:
        # its one-line error went to the worker's log, not to this terminal: repeat it
        raise StageFailed(
            f"stage {stage} on {deployment}: {result['failed']} (flow run {run.id})",
            retry=False,
            stage=stage,
        )
    raise StageFailed(
        f"stage {stage} on {deployment} ended {ended} (flow run {run.id})",
        retry=not (run.state is not None and run.state.is_cancelled()),
        stage=stage,
    )
