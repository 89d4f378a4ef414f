"""Stopping ``kiln run`` cleanly on Ctrl-C or SIGTERM: the stage processes clean up, the
pipeline's MLflow run is marked KILLED, and the command exits 130 within seconds."""

from __future__ import annotations

import contextlib
import os
import signal

INTERRUPTED = (
    "kiln: interrupted; re-run `kiln run` to resume (finished stages are kept, training "
    "resumes from its last checkpoint)"
)


def stop_on_interrupt() -> None:
    """Ctrl-C (or SIGTERM) stops ``kiln run`` within seconds, exit code 130.

    Left to itself, an interrupt reaches Prefect's local API server too (the same
    process group), and the flow then spends minutes retrying a dead server before
    failing with the wrong reason. Instead: interrupt the stage processes (they clean
    up their partial outputs; checkpoints are atomic), mark the pipeline's MLflow run
    KILLED, say how to resume, and exit. A second Ctrl-C exits at once."""

    def stop(signum, frame) -> None:
        try:
            signal.signal(signal.SIGINT, lambda *_: os._exit(130))
            # os.write: the interrupted code may be inside sys.stderr.write itself
            os.write(2, f"\n{INTERRUPTED}\n".encode())
            _stop_children()
            _mark_pipeline_killed()
        finally:
            os._exit(130)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def _stop_children(grace_s: float = 20.0) -> None:
    """Stop every descendant, each signalled once, so a stage cleans up its partial
    outputs undisturbed (a second SIGINT could cut that short). DVC and the stage run in
    a session of their own that a terminal's Ctrl-C did not reach: SIGINT them. Those
    in our own process group (Prefect's local server) got the terminal's SIGINT already,
    unless only this process was signalled: SIGTERM them if they are still up after a
    moment. SIGKILL whatever is left after ``grace_s``."""
    import psutil

    children = psutil.Process().children(recursive=True)
    mine, others = [], []
    for child in children:
        try:
            (mine if os.getpgid(child.pid) == os.getpgrp() else others).append(child)
        except OSError:
            continue
    for child in others:
        with contextlib.suppress(psutil.Error):
            child.send_signal(signal.SIGINT)
    _, late = psutil.wait_procs(mine, timeout=3)
    for child in late:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(others + late, timeout=grace_s)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


def _mark_pipeline_killed(timeout_s: float = 5.0) -> None:
    """End the pipeline's MLflow run as KILLED (bounded: a dead server must not hold
    the exit; the next run closes it otherwise)."""
    import threading

    from training import tracking

    run_id = os.environ.get(tracking.PARENT_ENV)
    if not run_id:
        return

    def end() -> None:
        with contextlib.suppress(Exception):
            from mlflow import MlflowClient

            tracking.setup()
            MlflowClient().set_terminated(run_id, status="KILLED")

    t = threading.Thread(target=end, daemon=True)
    t.start()
    t.join(timeout_s)
