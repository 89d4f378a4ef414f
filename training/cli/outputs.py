"""What ``kiln generate`` checks and writes around a model: the output folder (can it
be made, which number the next picture takes) and the prompts' length against the text
encoder's context; and the whole folder ``kiln export`` writes. Kept apart from the
commands (``training/cli/user.py``)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import typer

from training.cli.base import UserError


def can_create(d: Path) -> None:
    """Fail now if ``d`` could not be made or written, without creating it yet (a
    failed command must not leave an empty folder behind)."""
    probe = d.resolve()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise UserError(f"output directory {d} is not writable ({probe} is not a writable folder)")


def next_index(out: Path) -> int:
    """The number of the next picture ``kiln generate`` writes into ``out``: past every
    numbered picture (``NNNN-slug-seed.png``) and every manifest line already there, so
    a second run into one folder adds pictures instead of replacing ones that
    manifest.jsonl still describes. 0 for a folder that does not exist yet."""
    manifest = out / "manifest.jsonl"
    if manifest.exists() and not manifest.is_file():
        raise UserError(f"{manifest} is not a file; give another --out")
    try:
        taken = [
            int(m.group(1)) + 1
            for f in (out.iterdir() if out.is_dir() else ())
            if (m := re.fullmatch(r"(\d+)-.*\.png", f.name))
        ]
        lines = 0
        if manifest.is_file():
            with open(manifest, "rb") as f:  # bytes: a line cut by a crash still counts
                lines = sum(1 for line in f if line.strip())
    except OSError as exc:  # an unreadable folder or manifest
        raise UserError(f"cannot read output directory {out}: {exc}") from None
    return max([lines, *taken])


@contextlib.contextmanager
def claimed(out: Path) -> Iterator[tuple[int, IO[bytes]]]:
    """The first free number in ``out`` and its manifest open for appending, held under
    an exclusive lock on manifest.jsonl until the block ends: two ``kiln generate`` runs
    into one folder at once take turns writing, so neither picks numbers the other took
    (same prompt and seed would have overwritten the other's picture). Unbuffered: each
    line is on disk when ``disk.save_picture`` returns, none waits for a close to fail."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "manifest.jsonl", "ab", buffering=0) as manifest:  # closing unlocks
        fcntl.flock(manifest, fcntl.LOCK_EX)
        yield next_index(out), manifest


def below_one(value: float | None) -> float | None:
    """``--guidance-start``'s upper bound: a fraction below 1, ``check_request``'s [0, 1).
    typer's ``max`` is inclusive, so the option had max 0.99 and refused 0.995, a start
    the config, the REST model and the playground take."""
    if value is not None and not value < 1:  # NaN too
        raise typer.BadParameter(f"{value:g} is not a fraction in [0, 1)")
    return value


def warn_prompts(tokenizer, prompts: list[str]) -> None:
    """Warn once for each prompt longer than the text encoder's context (the model never
    sees the rest) or with text no training caption had (read as noise)."""
    from training.inference.text import prompt_notes

    for prompt in dict.fromkeys(prompts):
        for note in prompt_notes(tokenizer, prompt, f"prompt {prompt!r}"):
            typer.echo(f"kiln: warning: {note}", err=True)


def check_new_folder(out: Path) -> None:
    """Refuse an ``out`` that holds anything: ``save_pretrained`` adds to what a folder
    holds, and an earlier export's leftovers (a DiT's ``transformer/`` beside a U-Net
    pipeline) made the folder read as another model."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} is not an empty folder; export writes a new one")


def _umask() -> int:
    """The process's umask (read by setting it, then put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def whole_folder(out: Path) -> Iterator[Path]:
    """A folder to write ``out``'s content in, beside it, renamed into place when the
    block ends without an error: an interrupted export leaves no half pipeline. Made
    with the user's umask, as ``mkdir`` makes ``out``: ``tempfile.mkdtemp`` makes it
    0700 whatever the umask, and the exported folder was unreadable to the rest of a
    team sharing it (drwx------ under umask 022)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        os.replace(tmp, out)  # onto nothing, or onto the empty folder check_new_folder saw
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
