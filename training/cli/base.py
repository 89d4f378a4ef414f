"""What every ``kiln`` command shares: one-line errors, the checks made before any work,
and the failure notes the Prefect flow reads.

Errors a user can fix (bad params, missing inputs, unwritable output, diverged
training) end with one ``kiln: error: ...`` line and exit code 1. ``KILN_DEBUG=1`` shows
the traceback instead.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import signal
from pathlib import Path

import typer

from training import paths as P
from training.disk import write_json
from training.errors import UserError

__all__ = ["UserError", "fail", "failure_note", "transient"]


def fail(msg: str) -> None:
    typer.echo(f"kiln: error: {msg}", err=True)
    raise typer.Exit(1)


def prefixed(stage: str, msg: str) -> str:
    """``stage: msg``, without doubling a prefix the message already carries."""
    return msg if msg.startswith(f"{stage}:") or msg.startswith(f"{stage} ") else f"{stage}: {msg}"


# Errno values of failures that may pass on their own (a server restarting, a network
# blip); a retry can help those, and only those.
_TRANSIENT_ERRNOS = {
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EPIPE,
    errno.EAGAIN,
}


def transient(exc: BaseException) -> bool:
    """Whether a retry of the same stage could succeed (the flow retries only those)."""
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


class Terminated(KeyboardInterrupt):
    """SIGTERM in a stage command: what a process manager, Kubernetes evicting a pod or
    a batch scheduler sends. Raised like Ctrl-C's KeyboardInterrupt, so the stage cleans
    up the same way (outs emptied, its MLflow run KILLED, checkpoints kept), where the
    default action killed it on the spot with its run left RUNNING and half an output."""


def terminate_like_interrupt() -> None:
    """A stage command takes SIGTERM as it takes Ctrl-C (raising :class:`Terminated`)."""

    def terminated(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
        raise Terminated

    signal.signal(signal.SIGTERM, terminated)


def record_failure(stage: str, msg: str, retry: bool) -> None:
    """Leave the flow a note: why the stage failed and whether retrying can help. A stage
    that dies without a word (killed, out of memory) leaves none and is retried."""
    # a full or read-only disk leaves no note: the flow then treats it as retryable
    with contextlib.suppress(OSError):
        write_json(failure_note(stage), {"message": msg, "retry": retry})


def failure_note(stage: str) -> Path:
    return P.STATE / f"failed-{stage}.json"


def load_params(path: Path = P.PARAMS):
    from training import config

    return config.load(path)


def raw_params() -> dict:
    """params.yaml as a plain mapping ({} when there is none)."""
    import yaml

    from training.config import ConfigError
    from training.params_file import load_yaml

    if not P.PARAMS.exists():
        return {}
    try:
        return load_yaml(P.PARAMS.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{P.PARAMS}: not valid YAML: {exc}") from None


def require(*paths: Path) -> None:
    for p in paths:
        if not p.exists() or (p.is_dir() and not any(p.iterdir())):
            raise UserError(
                f"missing stage input {p}: run the upstream stage first (`dvc repro` or `kiln run`)"
            )


def writable(*dirs: Path) -> None:
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / ".kiln-write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"output directory {d} is not writable ({exc.strerror})") from None


def cleanup(outs: list[Path]) -> None:
    for out in outs:
        if out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
        elif out.exists():
            out.unlink()
