"""One pipeline at a time per checkout, and no MLflow run left RUNNING by a dead one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training import runlock

from .conftest import REPO, kiln, project_env

HOLD = """
import sys, time
from pathlib import Path
from training import runlock
with runlock.pipeline_lock("kiln run (shapes)", Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(root: Path) -> subprocess.Popen:
    """Another process holding ``root``'s run lock, as a running ``kiln run`` does."""
    env = {k: v for k, v in os.environ.items() if k != runlock.HOLDER_ENV}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_is_exclusive_reentrant_and_dies_with_its_holder(tmp_path, monkeypatch):
    monkeypatch.delenv(runlock.HOLDER_ENV, raising=False)
    holder = _holder(tmp_path)
    try:
        busy = rf"kiln run \(shapes\) \(pid {holder.pid}"
        with pytest.raises(runlock.PipelineBusy, match=busy), runlock.pipeline_lock("2", tmp_path):
            pass
        with pytest.raises(runlock.PipelineBusy, match="train_vae: kiln run"):
            runlock.check_free("train_vae", tmp_path)
        monkeypatch.setenv(runlock.HOLDER_ENV, str(holder.pid))  # a stage the run started
        runlock.check_free("train_vae", tmp_path)
        monkeypatch.delenv(runlock.HOLDER_ENV)
    finally:
        holder.kill()  # like SIGKILL: the kernel drops the flock with the process
        holder.wait()
    runlock.check_free("train_vae", tmp_path)
    with runlock.pipeline_lock("first", tmp_path):
        assert os.environ[runlock.HOLDER_ENV] == str(os.getpid())
        with runlock.pipeline_lock("the flow, inside kiln run", tmp_path):  # re-entrant
            pass
    assert runlock.HOLDER_ENV not in os.environ


STAGE = """
import sys, time
from pathlib import Path
from training import runlock
with runlock.stage_lock("train_unet", Path(sys.argv[1])):
    print("training", flush=True)
    time.sleep(120)
"""


def test_a_stage_run_by_hand_keeps_a_pipeline_out_while_it_runs(tmp_path, monkeypatch):
    """The bug: a by-hand `kiln train-unet` checked the lock for an instant and then held
    nothing, so a `kiln run` started while it trained took the checkout and rewrote
    params.yaml and data/ under it."""
    monkeypatch.delenv(runlock.HOLDER_ENV, raising=False)
    env = {k: v for k, v in os.environ.items() if k != runlock.HOLDER_ENV}
    stage = subprocess.Popen(
        [sys.executable, "-c", STAGE, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert stage.stdout.readline().strip() == "training"
        busy = "another kiln run or a stage run by hand is running"
        with (
            pytest.raises(runlock.PipelineBusy, match=busy),
            runlock.pipeline_lock("kiln run (digits)", tmp_path),
        ):
            pass
        with runlock.stage_lock("train_vae", tmp_path):  # stages by hand share it
            pass
    finally:
        stage.kill()
        stage.wait()
    with runlock.pipeline_lock("kiln run (digits)", tmp_path):  # the stage is gone
        pass


def test_a_killed_runs_record_is_not_named_as_the_holder(tmp_path, monkeypatch):
    """Found in review: after a SIGKILLed `kiln run`, its record stayed in the lock file,
    and a stage run by hand holding the lock was reported as that dead run (its pid)."""
    monkeypatch.delenv(runlock.HOLDER_ENV, raising=False)
    holder = _holder(tmp_path)
    holder.kill()  # the record stays; the kernel drops the lock
    holder.wait()
    env = {k: v for k, v in os.environ.items() if k != runlock.HOLDER_ENV}
    stage = subprocess.Popen(
        [sys.executable, "-c", STAGE, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert stage.stdout.readline().strip() == "training"
        with (
            pytest.raises(runlock.PipelineBusy) as busy,
            runlock.pipeline_lock("kiln run (digits)", tmp_path),
        ):
            pass
        said = str(busy.value)
        assert said.startswith("another kiln run or a stage run by hand is running"), said
        assert str(holder.pid) not in said
    finally:
        stage.kill()
        stage.wait()


def test_second_kiln_run_is_refused_before_touching_params_or_data(project: Path):
    """The bug: a second `kiln run --dataset digits` rewrote params.yaml and re-ingested
    into the shared data/ while the first (shapes) run was training."""
    params_before = (project / "params.yaml").read_text()
    clean = project / "data" / "clean"
    clean.mkdir(parents=True)
    (clean / "shard.tar").write_text("the running pipeline's data")
    holder = _holder(project)
    try:
        t0 = time.monotonic()
        proc = kiln(project, "run", "--dataset", "digits", check=False)
        took = time.monotonic() - t0
        stage = kiln(project, "validate", check=False)  # a stage by hand, mid-run
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kiln: error:")]
    assert len(errors) == 1 and "is running in this checkout" in errors[0], proc.stderr
    assert f"pid {holder.pid}" in errors[0]
    assert took < 60, took  # refused at once, not after ingesting
    assert (project / "params.yaml").read_text() == params_before
    assert stage.returncode == 1 and "validate: kiln run (shapes)" in stage.stderr
    assert (clean / "shard.tar").read_text() == "the running pipeline's data"


CLOSE = """
import json, sys
from mlflow import MlflowClient
from training import tracking
mlflow = tracking.setup()
client = MlflowClient()
exp = mlflow.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
ids = {}
for name, host, pid in json.loads(sys.argv[1]):
    run = client.create_run(exp, run_name=name, tags={"kiln.host": host, "kiln.pid": str(pid)})
    ids[name] = run.info.run_id
closed = tracking.close_orphaned_runs()
print(json.dumps({
    "closed": sorted(name for name, i in ids.items() if i in closed),
    "status": {name: client.get_run(i).info.status for name, i in ids.items()},
}))
"""


def test_runs_of_dead_processes_are_marked_killed(tmp_path: Path):
    import json

    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    time.sleep(1.5)  # the live process starts before its run, as a real stage does
    host = socket.gethostname()
    runs = [
        ["sigkilled stage", host, dead.pid],
        ["still training", host, alive.pid],
        ["other machine", "gpu-worker-7", dead.pid],  # cannot be checked from here
    ]
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CLOSE, json.dumps(runs)],
            cwd=tmp_path,
            env={**project_env(tmp_path), "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        alive.kill()
        alive.wait()
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["closed"] == ["sigkilled stage"]
    assert out["status"] == {
        "sigkilled stage": "KILLED",
        "still training": "RUNNING",
        "other machine": "RUNNING",
    }


HOLD_AND_SPAWN = """
import subprocess, sys, time
from pathlib import Path
from training import runlock
with runlock.pipeline_lock("kiln run (shapes)", Path(sys.argv[1])):
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('training', flush=True); time.sleep(120)"],
        pass_fds=runlock.held_fds(), stdout=sys.stdout,
    )
    print(child.pid, flush=True)
    time.sleep(120)
"""


def test_what_is_left_of_a_killed_run_is_named(tmp_path, monkeypatch):
    """`kill -9` of `kiln run`: the stage it started inherits the lock and trains on.
    The refusal named no process; it names the stage still holding the checkout."""
    monkeypatch.delenv(runlock.HOLDER_ENV, raising=False)
    env = {k: v for k, v in os.environ.items() if k != runlock.HOLDER_ENV}
    run = subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_SPAWN, str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    lines = {run.stdout.readline().strip() for _ in range(2)}
    child = int(next(x for x in lines if x.isdigit()))
    assert "training" in lines
    run.kill()  # SIGKILL: the child keeps the lock and trains on
    run.wait()
    try:
        with (
            pytest.raises(runlock.PipelineBusy) as busy,
            runlock.pipeline_lock("kiln run (digits)", tmp_path),
        ):
            pass
        said = str(busy.value)
        assert f"what is left of a killed kiln run (shapes) (pid {run.pid}" in said, said
        assert f"pid {child} (" in said and "wait for it or stop it" in said
    finally:
        os.kill(child, 9)
