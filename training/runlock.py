"""One pipeline at a time per checkout.

DVC locks one stage at a time, not a whole pipeline: a second ``kiln run`` started
while the first was training would rewrite ``params.yaml`` and re-ingest another
dataset into the shared ``data/`` before DVC noticed, and the first run would then
evaluate (and promote) its model on the other run's data. So every entry point that
writes ``params.yaml`` or runs stages takes this lock first, and stage commands started
by hand (or by a by-hand ``dvc repro``) refuse to run while a pipeline holds it.

The lock is an ``flock`` on ``.kiln/run.lock``: the kernel drops it when the holder
dies, so a SIGKILLed run never leaves a stale lock behind. The file also records who
holds it (pid, host, start time, what it runs) so the refusal names the other run.
Stage processes that a pipeline starts inherit ``KILN_RUN_LOCK_HOLDER`` and pass.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

LOCK = Path(".kiln") / "run.lock"
HOLDER_ENV = "KILN_RUN_LOCK_HOLDER"


class PipelineBusy(RuntimeError):
    """Another pipeline run holds this checkout; the message names it."""


_held: dict[Path, int] = {}  # lock path -> fd, for re-entry within one process


def _describe(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    started = time.strftime("%H:%M:%S", time.localtime(info.get("started", 0)))
    if info and _gone(info):
        # the run was killed, but the stage it started (which inherited the lock) goes
        # on: named by what holds the file now (was: no process named at all)
        left = _holders(path, started_by=info["pid"])
        if left:
            return (
                f"what is left of a killed {info.get('what', 'kiln run')} (pid {info['pid']}, "
                f"started {started}): {', '.join(left[:3])}; wait for it or stop it"
            )
    if not info or _gone(info):  # a stage run by hand holds it shared and records nothing
        # (a record whose process is gone was left by a killed run: was named as the holder)
        return "another kiln run or a stage run by hand"
    return (
        f"{info.get('what', 'a kiln run')} (pid {info.get('pid')} on {info.get('host')}, "
        f"started {started})"
    )


def _holders(path: Path, started_by: int) -> list[str]:
    """``pid N (command)`` of this host's processes that have ``path`` open and were
    started by the run ``started_by`` (``HOLDER_ENV`` in their environment: a stage run
    by hand meanwhile is not one). Linux's /proc; [] elsewhere or where unreadable."""
    found = []
    mark = f"{HOLDER_ENV}={started_by}".encode()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        pid = int(fd_dir.parent.name)
        if pid == os.getpid():
            continue
        try:
            if not any(os.readlink(f) == str(path) for f in fd_dir.iterdir()):
                continue
            if mark not in (fd_dir.parent / "environ").read_bytes().split(b"\0"):
                continue
            argv = (fd_dir.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or another user's
            continue
        command = " ".join(a.decode(errors="replace") for a in argv[:3] if a)
        found.append(f"pid {pid} ({command[:60]})")
    return found


def _gone(info: dict) -> bool:
    """Whether the recorded holder is a process of this host that no longer runs."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return False  # another host's (a shared checkout): it cannot be checked here
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


@contextlib.contextmanager
def pipeline_lock(what: str, root: Path | None = None) -> Iterator[None]:
    """Hold the checkout's run lock for the body, or raise ``PipelineBusy`` at once.

    Re-entrant within one process (``kiln run`` takes it before writing params.yaml, and
    the flow it calls takes it again). Children see ``KILN_RUN_LOCK_HOLDER``."""
    path = (root or Path.cwd()).resolve() / LOCK
    if path in _held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    for attempt in range(5):  # check_free holds LOCK_SH for an instant
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt < 4:
                time.sleep(0.1)
    else:
        os.close(fd)
        raise PipelineBusy(
            f"{_describe(path)} is running in this checkout; wait for it to finish "
            "(or stop it), or use another checkout. Two runs would share data/ and "
            "params.yaml."
        ) from None
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({**record, "what": what}).encode())
    _held[path] = fd
    previous = os.environ.get(HOLDER_ENV)
    os.environ[HOLDER_ENV] = str(os.getpid())
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(HOLDER_ENV, None)
        else:
            os.environ[HOLDER_ENV] = previous
        del _held[path]
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor releases the flock


def held_fds() -> tuple[int, ...]:
    """The descriptors of the locks this process holds: pass them to a child
    (``pass_fds``) that must keep the checkout locked for as long as it runs."""
    return tuple(_held.values())


@contextlib.contextmanager
def stage_lock(stage: str, root: Path | None = None) -> Iterator[None]:
    """For a stage command: refuse to run while a pipeline that did not start it holds
    the checkout (a by-hand ``kiln train-unet`` or ``dvc repro`` during ``kiln run``), and
    hold a shared lock for the whole body, so a ``kiln run`` started meanwhile is refused
    instead of rewriting params.yaml and data/ under the stage. Stages by hand share it:
    they may run side by side, as DVC lets them."""
    if os.environ.get(HOLDER_ENV):
        yield  # started by the pipeline that holds the lock
        return
    path = (root or Path.cwd()).resolve() / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineBusy(
                f"{stage}: {_describe(path)} is running in this checkout; run stages by hand "
                "only when no pipeline is running"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the shared lock


def check_free(stage: str, root: Path | None = None) -> None:
    """``stage_lock``'s check alone, released at once."""
    with stage_lock(stage, root):
        pass
