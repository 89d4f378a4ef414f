"""Prefect tasks that run one DVC stage: ``dvc repro --single-item <stage>`` in a
process group of its own, retried only when a retry can help.

DVC decides what is stale (a stage whose deps, params and outs are unchanged is
skipped); Prefect decides when and where, and retries the transient failures
(ingestion; a crashed training stage resumes from its checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from prefect import get_run_logger, task

from flows import dvc_cache
from training import stages
from training.env import offline_defaults

# what every Kiln process sets (no telemetry, no hub downloads), before the DVC and
# MLflow work of this process and of the stage processes it starts
offline_defaults()

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


# prefect.yaml's deployment names, each behind the project's KILN_REGISTRY_PREFIX
DEPLOYMENT_BASES = ("kiln-pipeline", "gpu", "cpu")


def refuse_other_project() -> None:
    """Refuse a run of another project's deployment. Projects on one Prefect server
    share the pools (README, "Several projects on one server"); a worker started without
    ``--work-queue`` takes any project's run and would run it in this checkout, under
    this project's registry names. Only prefect.yaml's names are checked: a deployment
    named otherwise is the user's own."""
    from prefect.runtime import deployment

    from training.stages import PREFIX, REGISTRY_PREFIX_ENV

    name = deployment.name
    if not name:
        return
    for base in DEPLOYMENT_BASES:
        if name.endswith(base) and name != PREFIX + base:
            raise StageFailed(
                f"deployment {name!r} is another project's: this worker's "
                f"{REGISTRY_PREFIX_ENV} is {PREFIX!r} (its deployments end in "
                f"{PREFIX + base!r}); start each project's workers with --work-queue "
                f"<prefix>default (README, 'Running at scale')",
                retry=False,
            )


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
    _restore_persistent(stage)
    try:
        _dvc_cmd("repro", "--single-item", stage, what=f"stage {stage}")
    except StageFailed as exc:
        if not note.is_file():
            if dvc_cache.short_of_room(ROOT, stage):  # DVC's own failure: no retry
                outs = [str(o) for o in stages.BY_NAME[stage].outs]
                raise StageFailed(dvc_cache.not_stored(ROOT, stage, outs), False, stage) from exc
            raise StageFailed(str(exc), stage=stage) from exc
        info = json.loads(note.read_text())
        raise StageFailed(
            info["message"], retry=bool(info["retry"]), stage=stage, said=True
        ) from exc
    if dvc_cache.short_of_room(ROOT, stage) and (lost := dvc_cache.uncached(ROOT, stage, _dvc())):
        raise StageFailed(dvc_cache.not_stored(ROOT, stage, lost), retry=False, stage=stage)


@task(name="ingest", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_retryable)
def ingest_task() -> None:
    """Ingestion talks to servers: transient failures are retried (img2dataset itself
    resumes completed shards incrementally); a missing or bad source is not. The
    source probe runs first: ingest runs only when the source changed (and then
    fetches only what it gained)."""
    _run_dvc_stage(stages.SOURCE_PROBE)
    _run_dvc_stage("ingest")


def _restore_persistent(stage: str) -> None:
    """A persistent output (data/raw, data/latents) is kept between runs, so DVC never
    restores it from its run cache: with it deleted (``make clean``) and the cache
    still there, `dvc repro` would fetch or encode it all again. Check it out from the
    cache first (a no-op when the cache lacks it: the stage then makes it anew)."""
    spec = stages.BY_NAME.get(stage)
    if spec is None or not spec.persist or not (ROOT / "dvc.lock").is_file():
        return
    if not (ROOT / spec.outs[0]).exists():
        _dvc_cmd("checkout", "--allow-missing", "--quiet", stage, what=f"dvc checkout {stage}")


# Stages that checkpoint: a retry resumes them, so it costs at most the steps since the
# newest checkpoint. The others fail for a reason (bad data, a config error) and would
# only fail again, so they are not retried.
CHECKPOINTED = tuple(s.name for s in stages.STAGES if s.checkpoints)


def retries(stage: str) -> int:
    """How often ``stage`` runs again after dying without a word: once for a
    checkpointed stage (a lost worker, OOM), which resumes from its newest complete
    checkpoint; never for the others. The one count for both routes, in this process
    (``_stage``) and on a worker (``flows.stage.run_remote``)."""
    return 1 if stage in CHECKPOINTED else 0


@task(name="stage", retry_delay_seconds=10, retry_condition_fn=_retryable)
def stage_task(stage: str) -> None:
    _run_dvc_stage(stage)


def _stage(stage: str):
    """The stage's task, retried as ``retries`` says."""
    return stage_task.with_options(name=stage, retries=retries(stage))


def run_local(stage: str) -> None:
    """Run ``stage`` in this process as its task, whoever asks (kiln-pipeline, or
    kiln-stage by hand): ingest always with its source probe first and ingest's own
    retries, or a by-hand ingest would trust a stale probe and skip new data."""
    if stage == "ingest":
        ingest_task()
    else:
        _stage(stage)(stage=stage)


def _set_params(
    profile: str | None, dataset: str | None, source: str | None, mode: str | None = None
) -> None:
    """Write a run's profile / data / mode choices into params.yaml, where DVC tracks
    them."""
    from training import config
    from training.params_file import read_value

    now = read_value(ROOT / "params.yaml", "ingest.dataset")
    updates = config.run_choices(dataset, source, profile, mode, now)
    if updates:
        for key, (old, new) in config.set_values(ROOT / "params.yaml", updates).items():
            print(f"params.yaml: {key}: {old} -> {new}")
