"""Shared fixtures. Tests that run the pipeline work on a fresh copy of the repository
(its git-tracked and not-ignored files), never in the checkout itself."""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# ---- make test's two workers (pytest-xdist) --------------------------------------------
# `make test` runs the suite on N workers (-n, --dist loadscope). Two trainings with
# torch's default threads on the same cores thrash (5.1 steps/s between them against 11.3
# alone: RESULTS.md, "Torch threads"); two with one thread each make 13.7. So a worker
# and every command it starts (the variable is inherited) take their share of the CPUs,
# unless the user set OMP_NUM_THREADS.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
if _WORKERS > 1 and not os.environ.get("OMP_NUM_THREADS"):
    from training.env import thread_plan

    os.environ["OMP_NUM_THREADS"] = str(max(1, thread_plan({}).cpus // _WORKERS))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# The modules built on the session's e2e run (``e2e_run``): xdist must send them all to
# one worker, or each worker would make that run itself.
SHARED_RUN = frozenset(
    f"tests/{f.name}" for f in Path(__file__).parent.glob("test_*.py") if "e2e_run" in f.read_text()
)


def _unit(nodeid: str) -> str:
    """A test's scheduling unit: its module, or "e2e_run" for the modules in SHARED_RUN."""
    module = nodeid.split("::", 1)[0]
    return "e2e_run" if module in SHARED_RUN else module


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first: the e2e run's modules (23 of the 66 minutes one process takes),
    then the other ``e2e`` modules, then the rest, so that no worker is left with a long
    module at the end while the other idles (``--no-loadscope-reorder`` keeps this
    order; xdist would sort the units by test count)."""

    def rank(item: pytest.Item) -> int:
        if _unit(item.nodeid) == "e2e_run":
            return 0
        return 1 if item.get_closest_marker("e2e") else 2

    items.sort(key=rank)  # stable: each module's own order stays


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # without pytest-xdist the suite runs in one process
    pass
else:

    class _ModuleScheduling(LoadScopeScheduling):
        """``--dist loadscope`` with ``_unit`` as the scope: a module's tests stay on one
        worker (its module fixtures run once) and the e2e run's modules share one.
        (xdist's own ``loadgroup`` cannot do it on pytest 9.2: it renames ``item._nodeid``,
        which pytest no longer reads.)"""

        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    # optionalhook: `pytest -p no:xdist` does not know the hook and must still collect
    @pytest.hookimpl(tryfirst=True, optionalhook=True)
    def pytest_xdist_make_scheduler(config: pytest.Config, log) -> LoadScopeScheduling | None:
        return _ModuleScheduling(config, log) if config.getvalue("dist") == "loadscope" else None


def project_env(project: Path) -> dict[str, str]:
    """Environment for commands run in a project copy: its own MLflow DB (the default
    sqlite file in the project root), its own Prefect home, the venv's bin on PATH."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "KILN_"))
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PREFECT_HOME"] = str(project / ".prefect")
    env["PYTHONUNBUFFERED"] = "1"
    # the copy's own code: the venv's editable install would otherwise import the
    # checkout's training/ (and DVC would hash one tree while another ran)
    env["PYTHONPATH"] = str(project)
    return env


def prefect_server_settings(servers: Path) -> dict[str, str]:
    """A loopback Prefect server's own settings: its SQLite file in ``servers``, no
    analytics, no UI (the API is all a test reads)."""
    return {
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{servers / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }


def copy_project(dest: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"],
    ):
        subprocess.run(cmd, cwd=dest, check=True)
    return dest


def kiln(
    project: Path,
    *args: str,
    timeout: float = 600,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``kiln ARGS`` in ``project`` (extra environment variables in ``env``)."""
    proc = subprocess.run(
        [str(BIN / "kiln"), *args],
        cwd=project,
        env={**project_env(project), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"kiln {' '.join(args)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def py(project: Path, code: str, timeout: float = 600) -> str:
    """Run Python ``code`` in ``project`` (its own MLflow store and code); its stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=project,
        env=project_env(project),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


# ---- process state no test may leak ----------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def _shard_cache_outside_the_checkout(tmp_path_factory) -> Iterator[None]:
    """The loaders' shard cache (``Store.shared()``) for tests that name none: a folder
    of the session's (was: ``data/cache`` of the checkout the tests ran in, each worker
    process holding its lock for the session, so a stage run there meanwhile got a cold
    second cache folder). Commands run in project copies get their own (project_env)."""
    if os.environ.get("KILN_CACHE_DIR"):
        yield
        return
    os.environ["KILN_CACHE_DIR"] = str(tmp_path_factory.mktemp("shard-cache"))
    yield
    os.environ.pop("KILN_CACHE_DIR", None)


@pytest.fixture(autouse=True)
def _mlflow_reads_the_environment_again() -> Iterator[None]:
    """``tracking.setup()`` pins MLflow's process-wide tracking URI; after a test that
    ran it in-process, the next test's MLFLOW_TRACKING_URI was ignored by any client
    made before its own ``setup()`` (a gate reading the previous test's registry)."""
    yield
    if "mlflow" in sys.modules:
        from mlflow.tracking._tracking_service import utils

        utils._tracking_uri = None


# ---- the end-to-end run (tests/test_e2e.py, tests/test_dit_e2e.py) ---------------------
# make run's command with the U-Net's steps lowered (test_e2e.py's docstring says why)
E2E_BUDGET = {"train_unet.steps": 900}


@pytest.fixture(scope="session")
def e2e_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``kiln run --dataset shapes --profile tiny`` on a fresh copy, once per session."""
    from training import config

    project = copy_project(tmp_path_factory.mktemp("e2e") / "kiln")
    config.set_values(project / "params.yaml", E2E_BUDGET)
    proc = kiln(project, "run", "--dataset", "shapes", "--profile", "tiny", timeout=3000)
    return project, proc


def sigkill_after_checkpoint(
    project: Path, command: str, ckpt: Path, step: int, timeout: float = 300
) -> int:
    """Start ``kiln <command>`` in ``project``, SIGKILL it as soon as ``ckpt`` (a stage's
    checkpoint folder) holds a complete checkpoint at ``step`` or later, and return the
    last complete step: a training stage killed mid-run, as a crash would."""
    return signal_after_checkpoint(project, command, ckpt, step, signal.SIGKILL, timeout)[0]


def signal_after_checkpoint(
    project: Path, command: str, ckpt: Path, step: int, sig: int, timeout: float = 300
) -> tuple[int, int, str]:
    """``sigkill_after_checkpoint`` with any signal: (the last complete step, the exit
    code, stderr)."""

    def complete() -> list[int]:
        steps = (p for p in ckpt.glob("step-*") if (p / "COMPLETE").is_file())
        return sorted(int(p.name.split("-")[1]) for p in steps)

    proc = subprocess.Popen(
        [str(BIN / "kiln"), command], cwd=project, env=project_env(project),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while not any(s >= step for s in complete()):
        assert proc.poll() is None, f"kiln {command} finished before it could be signalled"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    return complete()[-1], proc.returncode, err


def outputs_copy(project: Path, dest: Path) -> Path:
    """The finished project with its data and models, without its tracking state."""
    ignore = shutil.ignore_patterns("mlflow.db", "mlartifacts", ".prefect", "checkpoints")
    shutil.copytree(project, dest, ignore=ignore)
    return dest


def stage_losses(project: Path, stage: str, metric: str = "loss") -> list[float]:
    """The logged training curve (``<stage>/<metric>``, the loss by default) of the
    project's (one) run of ``stage``, in step order."""
    import json

    out = py(
        project,
        f"""
import json
from mlflow import MlflowClient
c = MlflowClient()
runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
run = next(r for r in runs if "{stage}/{metric}" in r.data.metrics)
hist = sorted(c.get_metric_history(run.info.run_id, "{stage}/{metric}"), key=lambda m: m.step)
print(json.dumps([m.value for m in hist]))
""",
    )
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_project(tmp_path / "kiln")


@pytest.fixture(scope="module")
def control_png(tmp_path_factory) -> Path:
    """A 32 px control picture: a white square on black (its Canny edges, a square)."""
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("control") / "square.png"
    img = np.zeros((32, 32, 3), np.uint8)
    img[8:24, 8:24] = 255
    Image.fromarray(img).save(path)
    return path


# ---- real servers on loopback ---------------------------------------------------------
def free_port() -> int:
    """A free loopback port (for servers the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"{url}: server exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as r:
            if r.status == 200:
                return
        time.sleep(1)
    raise AssertionError(f"{url} did not come up in {timeout} s:\n{log.read_text()[-3000:]}")


class CountingImages(http.server.BaseHTTPRequestHandler):
    """Serves ``images`` (URL path -> bytes) and counts the requests for each path."""

    hits: Counter = Counter()
    images: dict[str, bytes] = {}

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        type(self).hits[self.path] += 1
        body = self.images.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)


@contextlib.contextmanager
def counting_server(images: dict[str, bytes]) -> Iterator[str]:
    """A loopback image server (``CountingImages``, its counts reset); yields its URL."""
    CountingImages.hits.clear()
    CountingImages.images = images
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CountingImages)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


@contextlib.contextmanager
def background(cmd: list[str], env: dict, cwd: Path, log: Path):
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_ok(env: dict, cwd: Path, *args: str, timeout: float = 300) -> str:
    proc = subprocess.run(
        list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@contextlib.contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A real filesystem of ``size`` (mount's ``size=``: 2m, 128k) mounted on ``folder``
    (made if missing) and unmounted afterwards: a full disk as the kernel makes one. The
    test is skipped where mounting needs root or mount(8) is missing."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB filesystem (tmpfs), unmounted afterwards."""
    with tmpfs(tmp_path / "disk", "2m") as disk:
        yield disk
