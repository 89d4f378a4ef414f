"""Writing files safely: atomic JSON, and a full disk as one clear error.

Torch-free, so the data stages (ingest, validate) and the CLI use it without loading the
training engine.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


class DiskFull(OSError):
    """A write found no room (ENOSPC/EDQUOT). An ``OSError`` with a one-line message, so
    the CLI's handler prints it as one ``kiln: error:`` line and the flow does not retry
    it (a retry would fill the same disk). safetensors' own ``SafetensorError`` is a bare
    ``Exception``: it would escape that handler as a traceback."""

    def __init__(self, message: str, code: int = errno.ENOSPC):
        super().__init__(message)  # one argument: str() is the message, no "[Errno 28]"
        self.errno = code


def write_json(path: str | Path, obj: Any) -> None:
    """Atomic JSON write (temp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (what ``disk_usage`` can ask about)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def mount_point(path: Path) -> Path:
    path = _existing(path)
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged writer may still use on ``path``'s filesystem."""
    return shutil.disk_usage(_existing(Path(path))).free


def disk_full_code(exc: BaseException) -> int | None:
    """ENOSPC/EDQUOT if ``exc`` means "no room", else None. safetensors reports the OS
    error only in its message ("... No space left on device (os error 28)")."""
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in (errno.ENOSPC, errno.EDQUOT) else None
    text = str(exc)
    if "No space left on device" in text or "os error 28" in text:
        return errno.ENOSPC
    if "Disk quota exceeded" in text or "os error 122" in text:
        return errno.EDQUOT
    return None


def disk_full(what: str, path: Path, needed: int | None, hint: str, code: int) -> DiskFull:
    need = f"needs {_mb(needed)}, " if needed is not None else "no space left: "
    return DiskFull(
        f"{what} {path}: {need}{_mb(free_bytes(path))} free on {mount_point(path)}; {hint}",
        code,
    )


@contextlib.contextmanager
def disk_full_errors(what: str, path: str | Path, needed: int | None = None) -> Iterator[None]:
    """Turn a full disk inside the block (an ``OSError`` or safetensors' bare
    ``SafetensorError``) into ``DiskFull`` naming ``what path``, the bytes it needs if
    known and the bytes free. For writes outside the checkpointer, e.g. a phase's final
    ``save_pretrained``. Other errors pass through unchanged."""
    try:
        yield
    except Exception as exc:
        code = disk_full_code(exc)
        if code is None or isinstance(exc, DiskFull):  # not a full disk, or said already
            raise
        path = Path(path)
        hint = f"free space on {mount_point(path)} and run the stage again"
        raise disk_full(what, path, needed, hint, code) from exc


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(new: Path, target: Path, trash: Path) -> None:
    """Put the folder ``new`` in place of ``target`` (an incremental stage's output, built
    beside the old one): two renames, the old one through ``trash``, then deleted. A
    crash between the renames leaves the old folder at ``trash``, where
    ``restore_dir`` finds it."""
    shutil.rmtree(trash, ignore_errors=True)
    if target.exists():
        os.replace(target, trash)
    os.replace(new, target)
    shutil.rmtree(trash, ignore_errors=True)


def restore_dir(target: Path, trash: Path) -> None:
    """After a crash between ``replace_dir``'s renames, the old folder goes back."""
    if trash.is_dir() and not target.exists():
        os.replace(trash, target)


def _append_line(manifest: IO[bytes], line: str) -> None:
    """Append ``line`` whole, or leave the manifest as it was (a write cut short by a
    full disk is cut off again)."""
    fd = manifest.fileno()
    start = os.lseek(fd, 0, os.SEEK_END)
    view = memoryview(line.encode("utf-8"))
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError:
        os.ftruncate(fd, start)
        raise


def save_picture(path: Path, image, manifest: IO[bytes], line: dict, done: int, again: str) -> None:
    """Write one picture and its line in ``manifest`` (opened unbuffered, ``"ab"``), both
    or neither: the PNG goes to a temp name and is renamed, then its line is appended.
    A full disk is one ``UserError`` saying how many pictures (``done``) are whole and
    listed, and ``again``: what to do once there is room. For ``kiln generate`` and the
    playground's gallery. Was: a traceback, a 0-byte PNG under its final name
    (``Image.save`` fails at closing the file, after its check for a failed write) and
    the lines of the pictures already written lost with the manifest's buffer."""
    from training.errors import UserError

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
        try:
            _append_line(manifest, json.dumps(line) + "\n")
        except OSError:
            path.unlink(missing_ok=True)
            raise
    except OSError as exc:
        if disk_full_code(exc) is None:
            raise
        raise UserError(
            f"no space left for {path} ({free_bytes(path) / 1e6:.1f} MB free on "
            f"{mount_point(path)}); the {done} pictures before it are written and in "
            f"{manifest.name}: free space and {again}"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
