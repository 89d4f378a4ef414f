"""The ``kiln-pipeline`` Prefect flow: one task per DVC stage, in order.

DVC decides what is stale (``dvc repro --single-item <stage>`` skips a stage whose
deps, params and outs are unchanged); Prefect decides when and where, retries the
transient failures (ingestion; a crashed training stage resumes from its checkpoint)
and keeps the run history. With no ``PREFECT_API_URL`` set, Prefect runs against its
ephemeral local API — nothing to start.

Where: by default every stage runs in this process (the embedded default). Given a
``gpu_deployment`` (a deployment of the ``kiln-stage`` flow on the ``gpu`` work pool,
see prefect.yaml), the GPU stages go there with ``run_deployment``. The two machines
share nothing but the Prefect API, the MLflow server and the DVC remote: this flow
pushes what it has made, the stage's worker pulls the deps it needs, runs the stage
and pushes its outs, and hands back the stage's ``dvc.lock`` entry and metrics (a
Prefect artifact); this flow merges them and pulls the outs.

All stage runs are nested under one MLflow pipeline run; the flow tags each stage's run
with the DVC hashes of its outputs once DVC has locked them, and publishes a markdown
artifact summarising the metrics.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from training import stages
from training.paths import EVAL, METRICS

ROOT = Path.cwd()


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; it already printed its own one-line error.

    ``retry`` says whether running it again can help: a stage that failed for a reason
    (bad input, a config error, a diverged loss, a full disk) leaves a note saying so
    (``kiln`` writes ``.kiln/failed-<stage>.json``) and would only fail the same way
    again; one that died without a word (killed, out of memory, a lost connection) may
    pass, and a checkpointed stage resumes where it stopped."""

    def __init__(
        self, message: str, retry: bool = True, stage: str | None = None, said: bool = False
    ):
        super().__init__(message)
        self.retry, self.stage, self.said = retry, stage, said


def _retryable(task, task_run, state) -> bool:
    """Prefect's retry condition: retry only what a retry can fix."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:
        return True
    return not isinstance(exc, StageFailed) or exc.retry


class _NoTracebackForStageFailed(logging.Filter):
    """Prefect logs every failed task with its traceback; for a stage that already
    explained itself, that wall of frames hides the one line that matters."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], StageFailed):
            record.exc_info, record.exc_text = None, None
        return True


def _dvc() -> list[str]:
    """The dvc executable beside this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).with_name("dvc")
    return [str(local)] if local.exists() else ["dvc"]


# Stages that want the accelerator: routed to the gpu pool when one is configured.
GPU_STAGES = tuple(s.name for s in stages.STAGES if s.data_parallel)
RESULT_KEY = "kiln-stage-result"  # the artifact a remote stage hands back


def _dvc_cmd(*args: str, what: str) -> None:
    logger = get_run_logger()
    cmd = [*_dvc(), *args]
    logger.info("$ %s", " ".join(cmd))
    # The stage commands are `kiln ...`: make sure this interpreter's bin dir (the venv's)
    # is on PATH even when nobody activated the venv (make run). Output goes straight to
    # the terminal so progress bars stay live.
    env = os.environ.copy()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    from training import runlock

    # DVC and the stage run in a session of their own, holding the run lock with us
    # (pass_fds: if this process dies first, the checkout stays locked until they end).
    # A terminal's Ctrl-C reaches only `kiln run`, which stops them once, in order
    # (training/cli/interrupt.py); whatever else ends this flow (SIGTERM, a Prefect cancel: both
    # raise through here) stops their whole group before the lock is released, so no
    # stage outlives its pipeline.
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, start_new_session=True, pass_fds=runlock.held_fds()
    )
    try:
        returncode = proc.wait()
    except BaseException:
        _stop_group(proc)
        raise
    if returncode != 0:
        raise StageFailed(f"{what} failed (dvc exit code {returncode})")


def _stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGINT a stage's process group (it cleans up its partial outputs), then SIGKILL
    whatever is left after ``grace_s``."""
    import signal

    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _run_dvc_stage(stage: str) -> None:
    from training.cli.base import failure_note

    note = ROOT / failure_note(stage)
    note.unlink(missing_ok=True)
    try:
        _dvc_cmd("repro", "--single-item", stage, what=f"stage {stage}")
    except StageFailed as exc:
        if not note.is_file():
            raise StageFailed(str(exc), stage=stage) from exc
        info = json.loads(note.read_text())
        raise StageFailed(
            info["message"], retry=bool(info["retry"]), stage=stage, said=True
        ) from exc


@task(name="ingest", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_retryable)
def ingest_task() -> None:
    """Ingestion talks to servers: transient failures are retried (img2dataset itself
    resumes completed shards incrementally); a missing or bad source is not."""
    _run_dvc_stage("ingest")


# Stages that checkpoint: a retry resumes them, so it costs at most the steps since the
# newest checkpoint. The others fail for a reason (bad data, a config error) and would
# only fail again, so they are not retried.
CHECKPOINTED = tuple(s.name for s in stages.STAGES if s.checkpoints)


@task(name="stage", retry_delay_seconds=10, retry_condition_fn=_retryable)
def stage_task(stage: str) -> None:
    _run_dvc_stage(stage)


def _stage(stage: str):
    """The stage's task: one retry for a checkpointed stage killed mid-run (a lost
    worker, OOM), which resumes from its newest complete checkpoint."""
    return stage_task.with_options(name=stage, retries=1 if stage in CHECKPOINTED else 0)


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
    made_by = {out: name for name, st in stages.items() for out in st.get("outs", [])}
    return [made_by[d] for d in stages[stage].get("deps", []) if d in made_by]


def _set_params(profile: str | None, dataset: str | None, source: str | None) -> None:
    """Write a run's profile / data choices into params.yaml, where DVC tracks them."""
    from training import config

    updates = {
        k: v
        for k, v in (("profile", profile), ("ingest.dataset", dataset), ("ingest.source", source))
        if v
    }
    if updates:
        for key, (old, new) in config.set_values(ROOT / "params.yaml", updates).items():
            print(f"params.yaml: {key}: {old} -> {new}")


@flow(name="kiln-stage", log_prints=True)
def kiln_stage(
    stage: str,
    params_yaml: str | None = None,
    lock: dict | None = None,
    pipeline_run_id: str | None = None,
    profile: str | None = None,
    dataset: str | None = None,
    source: str | None = None,
) -> dict:
    """Run one DVC stage on this worker: take the caller's params and dvc.lock (when
    kiln-pipeline sends it; by hand, the checkout's own, with ``profile``/``dataset``/
    ``source`` applied), ``dvc pull`` the outs of the stages it reads, run it,
    ``dvc push`` its outs, and publish its dvc.lock entry and metrics as the
    ``kiln-stage-result`` artifact for the caller."""
    from training import runlock

    stages = _dvc_yaml()
    if stage not in stages:
        raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(stages)})")
    with runlock.pipeline_lock(f"kiln-stage {stage}", ROOT):
        return _stage_here(stage, params_yaml, lock, pipeline_run_id, profile, dataset, source)


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
    deps = upstream(stage)
    if deps:
        _dvc_cmd("pull", *deps, what=f"dvc pull of {', '.join(deps)}")
    _stage(stage)(stage=stage)
    _dvc_cmd("push", stage, what=f"dvc push of {stage}")
    metrics = ROOT / METRICS / f"{stage}.json"
    result = {
        "stage": stage,
        "lock": _lock()["stages"][stage],
        "metrics": metrics.read_text() if metrics.is_file() else None,
    }
    create_markdown_artifact(
        key=RESULT_KEY,
        markdown=f"```json\n{json.dumps(result, indent=1)}\n```",
        description=f"dvc.lock entry and metrics of {stage}",
    )
    return result


def _stage_result(flow_run_id) -> dict:
    """The ``kiln-stage-result`` artifact of a remote stage's flow run."""
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
        raise StageFailed(f"flow run {flow_run_id} left no {RESULT_KEY} artifact")
    text = found[0].data
    return json.loads(text[text.index("{") : text.rindex("}") + 1])


def _run_remote(stage: str, deployment: str, done: list[str], pipeline_run_id: str) -> None:
    """Run ``stage`` on the deployment's pool, exchanging data through the DVC remote."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    if done:
        _dvc_cmd("push", *done, what=f"dvc push of {', '.join(done)}")
    logger.info("%s -> deployment %s", stage, deployment)
    run = run_deployment(
        deployment,
        parameters={
            "stage": stage,
            "params_yaml": (ROOT / "params.yaml").read_text(),
            "lock": _lock(),
            "pipeline_run_id": pipeline_run_id,
        },
        flow_run_name=f"{stage}",
        timeout=None,
    )
    if run.state is None or not run.state.is_completed():
        name = run.state.name if run.state else "unknown"
        raise StageFailed(f"stage {stage} on {deployment} ended {name} (flow run {run.id})")
    result = _stage_result(run.id)
    lock = _lock()
    lock.setdefault("stages", {})[stage] = result["lock"]
    _write_lock(lock)
    if result["metrics"] is not None:
        path = ROOT / METRICS / f"{stage}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(result["metrics"])
    _dvc_cmd("pull", stage, what=f"dvc pull of {stage}")


def _notify_failure(flow, flow_run, state) -> None:
    """On failure, notify through the Prefect notification block named by
    ``KILN_NOTIFY_BLOCK`` (``slack-webhook/kiln-alerts``, say). Off when unset."""
    name = os.environ.get("KILN_NOTIFY_BLOCK")
    if not name:
        return
    from prefect.blocks.core import Block

    Block.load(name).notify(
        subject=f"Kiln: {flow_run.name} {state.name}",
        body=f"Flow run {flow_run.name} ({flow_run.id}) ended {state.name}: {state.message}",
    )


def _metrics(stage: str) -> dict:
    path = ROOT / METRICS / f"{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def summarize(params: dict, versions: dict[str, str]) -> tuple[str, str]:
    """(markdown for Prefect/MLflow, plain text for the terminal)."""
    ev = _metrics("evaluate")
    keys = [
        k
        for k in (
            "acc_all",
            "acc_all_seen",
            "acc_all_held_out",
            "acc_shape",
            "acc_colour",
            "acc_size",
            "acc_position",
            "acc_digit",
            "clip_score",
            "vae_psnr",
            "ceiling_acc_all_vae_recon",
            "images_per_s",
        )
        if k in ev
    ]
    md = [
        "# Kiln pipeline",
        "",
        f"dataset **{params['ingest']['dataset']}**, profile **{params['profile']}**",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    md += [f"| {k} | {ev[k]:.3f} |" for k in keys]
    md += ["", "| registered model | version |", "|---|---|"]
    md += [f"| {name} | {v} |" for name, v in versions.items()]
    text = [
        "",
        "Kiln pipeline finished.",
        f"  dataset {params['ingest']['dataset']}, profile {params['profile']}",
        "  registered models (MLflow registry):",
    ]
    text += [f"    models:/{name}/{v}" for name, v in versions.items()]
    text += ["  evaluation:"] + [f"    {k:<18} {ev[k]:.3f}" for k in keys]
    text += [
        "  report: data/eval/report.html",
        f"  next:   kiln generate {shlex.quote(_example_prompt())} -n 4 --out samples",
    ]
    return "\n".join(md), "\n".join(text)


def _example_prompt() -> str:
    """A prompt from this run's own evaluation set (so from the user's data), for the
    closing hint."""
    try:
        prompts = json.loads((ROOT / EVAL / "prompts.json").read_text())
        return next(p for p in prompts if isinstance(p, str) and p.strip())
    except (OSError, ValueError, StopIteration):
        return "a photo"


@flow(name="kiln-pipeline", log_prints=True, on_failure=[_notify_failure])
def kiln_pipeline(
    profile: str | None = None,
    dataset: str | None = None,
    source: str | None = None,
    gpu_deployment: str | None = None,
) -> dict:
    """ingest -> validate -> train_vae -> train_clip -> precompute_latents -> train_unet
    -> evaluate, each a DVC stage.

    ``profile``/``dataset``/``source`` are written into params.yaml first (where DVC
    tracks them); ``gpu_deployment`` (or ``KILN_GPU_DEPLOYMENT``), e.g.
    ``kiln-stage/gpu``, sends the GPU stages to that deployment's work pool."""
    from training import runlock

    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(_NoTracebackForStageFailed())
    with runlock.pipeline_lock("kiln-pipeline", ROOT):
        return _pipeline(profile, dataset, source, gpu_deployment)


def _pipeline(
    profile: str | None, dataset: str | None, source: str | None, gpu_deployment: str | None
) -> dict:
    from training import config, tracking

    closed = tracking.close_orphaned_runs(ROOT)
    if closed:
        print(f"marked {len(closed)} MLflow run(s) of dead earlier runs KILLED")
    _set_params(profile, dataset, source)
    gpu_deployment = gpu_deployment or os.environ.get("KILN_GPU_DEPLOYMENT") or None
    params = config.load(ROOT / "params.yaml")
    gate = (params.gate_metric(), params.evaluate.gate_min_delta)
    versions: dict[str, str] = {}
    done: list[str] = []
    with tracking.pipeline_run(params.to_dict(), ROOT) as parent:
        for stage in stages.NAMES:
            if stage == "ingest":
                ingest_task()
            elif gpu_deployment and stage in GPU_STAGES:
                _run_remote(stage, gpu_deployment, done, parent)
            else:
                _stage(stage)(stage=stage)
            done.append(stage)
            tracking.tag_stage_outputs(parent, stage, ROOT)
            if stage in tracking.REGISTERED_OUTS:
                # a stage DVC restored from its cache registered nothing: do it now
                version = tracking.ensure_registered(
                    parent, stage, ROOT, gate if stage == "evaluate" else None
                )
                if version is not None:
                    versions[tracking.MODEL_NAMES[stage]] = version
        name = tracking.MODEL_NAMES["evaluate"]
        champion = tracking.champion_version(name, ROOT)
        if name in versions and champion not in (None, versions[name]):
            # e.g. this data's model was registered earlier and another has won since
            print(
                f"note: this run's {name} is v{versions[name]}; @champion is v{champion} "
                "(the gate promotes only a version that beats it)"
            )
        md, text = summarize(params.to_dict(), versions)
        tracking.log_pipeline_summary(_metrics("evaluate"), md)
    create_markdown_artifact(markdown=md, key="kiln-summary", description="Kiln pipeline summary")
    return {"markdown": md, "text": text, "versions": versions, "metrics": _metrics("evaluate")}


if __name__ == "__main__":
    print(kiln_pipeline()["text"])
