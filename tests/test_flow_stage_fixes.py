"""The ``kiln-stage`` routes keep the pipeline's promises.

By hand, ``kiln-stage`` runs ingest as the pipeline does: the source probe first (new
pictures in the folder are fetched) and ingest's two retries. From the pipeline, a GPU
stage on a worker that is lost mid-run gets the retry it would get in-process (a
checkpointed stage, once); a stage that ran there and failed for a reason does not.
The remote side is a real Prefect deployment, served against ``prefect_test_harness``
by a runner in its own process; its first run dies by SIGKILL, as a lost worker does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from prefect import flow

from flows.tasks import GPU_STAGES, StageFailed, _stage
from tests.conftest import BIN, REPO, background, copy_project, project_env
from training import config


# ---- ingest by hand ---------------------------------------------------------------
def _pictures(folder: Path, ids: range) -> None:
    folder.mkdir(exist_ok=True)
    for i in ids:
        rng = np.random.default_rng(700 + i)
        img = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(img).resize((36, 36)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"picture {i}")


def _dvc(project: Path, *args: str) -> None:
    proc = subprocess.run(
        [str(BIN / "dvc"), *args], cwd=project, env=project_env(project),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


BY_HAND = """
import json
from prefect.client.orchestration import get_client
from flows.stage import kiln_stage
kiln_stage(stage="ingest")
with get_client(sync_client=True) as client:
    runs = client.read_task_runs()
print(json.dumps({r.name.rsplit("-", 1)[0]: r.empirical_policy.retries for r in runs}))
"""


def test_ingest_by_hand_runs_the_source_probe_and_fetches_new_pictures(tmp_path: Path):
    project = copy_project(tmp_path / "kiln")
    src = tmp_path / "pictures"
    _pictures(src, range(5))
    config.set_values(
        project / "params.yaml",
        {"ingest.dataset": "folder", "ingest.source": str(src), "ingest.processes": 1},
    )
    _dvc(project, "repro", "--single-item", "source")
    _dvc(project, "repro", "--single-item", "ingest")
    metrics = project / "data" / "metrics" / "ingest.json"
    assert json.loads(metrics.read_text())["successes"] == 5

    _pictures(src, range(5, 8))  # the source gained three
    proc = subprocess.run(
        [sys.executable, "-c", BY_HAND], cwd=project, env=project_env(project),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.loads(metrics.read_text())
    assert (m["successes"], m["rows_new"], m["rows_kept"]) == (8, 3, 5), m
    # the one ingest task, with the pipeline's retry policy (was: a plain stage task)
    tasks = json.loads(proc.stdout.strip().splitlines()[-1])
    assert tasks == {"ingest": 2}, tasks


# ---- a GPU stage on a worker ------------------------------------------------------
def test_a_remote_stage_is_retried_as_the_same_stage_in_process():
    from flows.stage import remote_stage_task
    from flows.tasks import retries

    assert remote_stage_task.retry_condition_fn is _stage("train_vae").retry_condition_fn
    assert remote_stage_task.retry_delay_seconds == _stage("train_vae").retry_delay_seconds
    for stage in GPU_STAGES:
        assert retries(stage) == _stage(stage).retries, stage
    assert retries("train_unet") == 1 and retries("precompute_latents") == 0


@flow(name="kiln-stage")
def lost_once(
    stage: str,
    params_yaml: str | None = None,
    lock: dict | None = None,
    pipeline_run_id: str | None = None,
    metrics: dict[str, str] | None = None,
) -> dict:
    """A worker's kiln-stage as its caller sees it: the first run of each stage is
    lost (SIGKILL, the flow process gone without a word); later ones hand back the
    caller's own lock entry (nothing changed), or ``fail`` says why, like a diverged
    stage that had its retries on the worker."""
    from flows.stage import _publish

    tries = Path(os.environ["KILN_TEST_TRIES"]) / stage
    tries.mkdir(parents=True, exist_ok=True)
    n = len(list(tries.iterdir()))
    (tries / str(n)).touch()
    if n == 0 and stage != "fail":
        os.kill(os.getpid(), signal.SIGKILL)
    if stage == "fail":
        _publish({"stage": stage, "failed": "fail: the loss diverged at step 7"})
        raise StageFailed("fail: the loss diverged at step 7", retry=False, stage=stage)
    result = {"stage": stage, "lock": lock["stages"][stage], "metrics": None}
    _publish(result)
    return result


@pytest.fixture()
def tiny_dvc(tmp_path: Path, monkeypatch) -> Path:
    """A DVC project with one locked, pushed stage (``train_vae``) as the caller's
    checkout: run_remote merges the lock entry the worker hands back and pulls."""
    import flows.stage
    import flows.tasks

    root = tmp_path / "caller"
    root.mkdir()
    (root / "params.yaml").write_text("profile: tiny\n")
    stages = {"cmd": "echo weights > vae.txt", "outs": ["vae.txt"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train_vae": stages}}))
    for args in (
        ("init", "--no-scm", "-q"),
        ("remote", "add", "-d", "r", str(tmp_path / "remote")),
        ("repro", "-q"),
        ("push", "-q"),
    ):
        _dvc(root, *args)
    monkeypatch.setattr(flows.stage, "ROOT", root)
    monkeypatch.setattr(flows.tasks, "ROOT", root)
    return root


def test_a_lost_worker_is_retried_and_a_failed_stage_is_not(tmp_path: Path, tiny_dvc: Path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from flows.stage import run_remote

    @flow
    def caller(stage: str) -> str:
        from prefect.runtime import flow_run

        run_remote(stage, "kiln-stage/gpu", [], "pipeline-run")
        return flow_run.id

    with prefect_test_harness():
        env = {
            **project_env(tmp_path),
            "PYTHONPATH": str(REPO),
            "PREFECT_API_URL": PREFECT_API_URL.value(),
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            "KILN_TEST_TRIES": str(tmp_path / "tries"),
        }
        serve = "from tests.test_flow_stage_fixes import lost_once; lost_once.serve(name='gpu')"
        with background([sys.executable, "-c", serve], env, REPO, tmp_path / "serve.log"):
            with get_client(sync_client=True) as client:
                deadline = time.monotonic() + 120
                while True:
                    try:
                        client.read_deployment_by_name("kiln-stage/gpu")
                        break
                    except Exception:
                        assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                        time.sleep(1)
            # lost mid-run, run again: the pipeline goes on (was: StageFailed, Crashed)
            parent = caller("train_vae")
            # a stage that ran on the worker and failed for a reason: one run, with its
            # reason in the error, though the task would allow a retry
            from flows.stage import remote_stage_task

            @flow
            def fails() -> None:
                once = remote_stage_task.with_options(retries=1, retry_delay_seconds=0)
                once("fail", "kiln-stage/gpu", {"stage": "fail"})

            with pytest.raises(StageFailed, match="the loss diverged at step 7"):
                fails()
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs()
                # both tries are the pipeline's children (tests/test_orchestration.py)
                kids = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])
                    )
                )
            assert sorted(k.name for k in kids) == ["train_vae", "train_vae"]
            states = sorted((r.name, r.state.type.value) for r in runs if r.deployment_id)
    assert states == [
        ("fail", "FAILED"),
        ("train_vae", "COMPLETED"),
        ("train_vae", "CRASHED"),
    ], states
    assert (tiny_dvc / "vae.txt").read_text() == "weights\n"


def test_a_fresh_worker_skips_a_stage_the_callers_lock_says_is_up_to_date(
    tmp_path: Path, monkeypatch
):
    """Found in review: a worker pulled only the outs of the stages a stage reads (and a
    persistent stage's own), so on a fresh worker (infra/'s gpu pools start one per job)
    DVC found the stage's outs missing and ran it again: every weekly run retrained the
    VAE, CLIP and U-Net and registered them again. The worker now pulls the stage's own
    outs as the caller's lock names them, and DVC skips the unchanged stage."""
    from prefect.testing.utilities import prefect_test_harness

    import flows.stage
    import flows.tasks

    caller, worker, remote = tmp_path / "caller", tmp_path / "worker", tmp_path / "remote"
    ran = tmp_path / "ran.txt"
    stages = {"cmd": f"echo x >> {ran} && echo weights > vae.txt", "outs": ["vae.txt"]}
    for root in (caller, worker):
        root.mkdir()
        (root / "params.yaml").write_text("profile: tiny\n")
        (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train_vae": stages}}))
        _dvc(root, "init", "--no-scm", "-q")
        _dvc(root, "remote", "add", "-d", "r", str(remote))
    _dvc(caller, "repro", "-q")
    _dvc(caller, "push", "-q")
    assert ran.read_text() == "x\n"
    lock = yaml.safe_load((caller / "dvc.lock").read_text())
    monkeypatch.setattr(flows.stage, "ROOT", worker)
    monkeypatch.setattr(flows.tasks, "ROOT", worker)

    @flow
    def on_the_worker() -> dict:
        return flows.stage._stage_here("train_vae", None, lock, None, None, None, None)

    with prefect_test_harness():
        result = on_the_worker()
    assert ran.read_text() == "x\n"  # not run again
    assert result["lock"] == lock["stages"]["train_vae"]
    assert (worker / "vae.txt").read_text() == "weights\n"


BUSY = """
import json
from prefect.client.orchestration import get_client
from flows.stage import RESULT_KEY, kiln_stage
from training.runlock import PipelineBusy
try:
    kiln_stage(stage="validate")
except PipelineBusy:
    pass
with get_client(sync_client=True) as client:
    found = client.read_artifacts()
print(json.dumps([a.data for a in found if a.key == RESULT_KEY]))
"""

HOLD = """
import sys, time
from pathlib import Path
from training import runlock
with runlock.pipeline_lock("kiln-stage train_unet (another pipeline)", Path.cwd()):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_busy_worker_hands_its_caller_the_reason(tmp_path: Path):
    """A stage sent to a worker whose checkout another pipeline's stage holds: the
    caller read "ended Failed" and the reason was only in the worker's log. The result
    artifact now says the checkout is busy, by whom, and what setting queues instead."""
    project = copy_project(tmp_path / "kiln")
    env = project_env(project)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD], cwd=project, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = subprocess.run(
            [sys.executable, "-c", BUSY], cwd=project, env=env,
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (artifact,) = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = json.loads(artifact[artifact.index("{") : artifact.rindex("}") + 1])["failed"]
    assert failed.startswith("this worker's checkout is busy: ")
    assert "another pipeline" in failed and "--limit 1" in failed
