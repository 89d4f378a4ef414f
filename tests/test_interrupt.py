"""Faults in a running pipeline, delivered as a terminal and the kernel deliver them.

A SIGKILLed ``kiln run`` cannot end its MLflow runs; the next run marks them KILLED.
Ctrl-C (SIGINT to the whole foreground process group, Prefect's local server included)
stops ``kiln run`` within seconds with exit code 130 and says how to resume, instead of
minutes of retries against a dead server ending in ``Connection refused``. SIGTERM (a
process manager, a Prefect worker) stops it too, and no process of the run outlives it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from training import config

from .conftest import BIN, project_env, py

pytestmark = pytest.mark.e2e

FAST = {
    "ingest.num_samples": 300,
    "train_vae.steps": 3000,  # long enough to be caught mid-stage, even when resumed,
    "train_vae.target_psnr": None,  # with no early stop at 30 dB
    "train_clip.steps": 20,
    "train_unet.steps": 20,
}


def _start(project: Path, log: Path) -> subprocess.Popen:
    """`kiln run` as its own process group: the group is what a terminal signals."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [str(BIN / "kiln"), "run"],
            cwd=project,
            env=project_env(project),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_for(log: Path, proc: subprocess.Popen, needle: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in log.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"kiln run exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"no {needle!r} in {timeout} s:\n{log.read_text()[-3000:]}")


RUNS = """
import json
from mlflow import MlflowClient
from training import tracking
mlflow = tracking.setup()
runs = mlflow.search_runs(experiment_names=[tracking.EXPERIMENT], output_format="list")
print(json.dumps({r.info.run_id: [r.info.run_name, r.info.status] for r in runs}))
"""


def _runs(project: Path) -> dict[str, list[str]]:
    return json.loads(py(project, RUNS, timeout=300).strip().splitlines()[-1])


def _wait_for_run(project: Path, proc: subprocess.Popen, name: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if [name, "RUNNING"] in _runs(project).values():
            return
        assert proc.poll() is None, f"kiln run exited {proc.returncode}"
        time.sleep(1)
    raise AssertionError(f"no RUNNING {name} MLflow run in {timeout} s")


def _cwd(p: psutil.Process) -> Path | None:
    try:
        return Path(p.cwd())
    except psutil.Error:
        return None


STAGE_STARTED = "Running stage 'train_vae'"


def _stop_mid_stage(project: Path, log: Path, stop) -> tuple[int, float, str]:
    """Start `kiln run`, wait until train_vae has opened its MLflow run, ``stop(proc)``;
    returns (exit code, seconds it took to exit, its output)."""
    proc = _start(project, log)
    try:
        _wait_for(log, proc, STAGE_STARTED)
        _wait_for_run(project, proc, "train_vae")
        t0 = time.monotonic()
        stop(proc)
        rc = proc.wait(timeout=120)
        return rc, time.monotonic() - t0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _nothing_left_running(project: Path) -> None:
    time.sleep(1)  # DVC and the stage run in a session of their own
    assert not [p.info["cmdline"] for p in psutil.process_iter(["cmdline"]) if _cwd(p) == project]


def _kill_everyone(proc: subprocess.Popen) -> None:
    """Like a lost machine: every process of the run at once."""
    for pid in [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(True))]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_sigkill_then_ctrl_c_then_sigterm(project: Path, tmp_path: Path):
    config.set_values(project / "params.yaml", FAST)

    _stop_mid_stage(project, tmp_path / "first.log", _kill_everyone)
    runs = _runs(project)
    orphans = {i for i, (_, status) in runs.items() if status == "RUNNING"}
    names = {runs[i][0] for i in orphans}
    assert {"kiln-pipeline", "train_vae"} <= names, names

    # Ctrl-C: the terminal signals its whole foreground group
    rc, took, out = _stop_mid_stage(
        project, tmp_path / "second.log", lambda p: os.killpg(p.pid, signal.SIGINT)
    )
    after = out[out.index(STAGE_STARTED) :]
    assert rc == 130, out[-3000:]
    assert took < 30, took
    assert "interrupted; re-run `kiln run` to resume" in out
    assert "Connection refused" not in after and "Traceback" not in after, after[-3000:]
    assert "marked 2 MLflow run(s) of dead earlier runs KILLED" in out
    runs = _runs(project)
    assert all(runs[i][1] == "KILLED" for i in orphans), runs
    # the interrupted run's own pipeline and stage runs are not left RUNNING either
    assert not [r for r in runs.values() if r[1] == "RUNNING"], runs
    assert not (project / "data" / "models" / "vae").exists()  # nothing half-written
    _nothing_left_running(project)

    # SIGTERM to `kiln run` alone, as a process manager or a Prefect worker sends it:
    # Prefect turns it into an exception inside the flow, which stops the stage's group
    rc, took, out = _stop_mid_stage(project, tmp_path / "third.log", lambda p: p.terminate())
    assert rc in (130, 143), out[-3000:]
    assert took < 60, took
    _nothing_left_running(project)
    assert not [r for r in _runs(project).values() if r[1] == "RUNNING"], _runs(project)
