"""img2dataset's shards that did not finish, and why: a full disk said as one, not as a
network fault.

img2dataset tells why a shard failed only in its workers' tracebacks (hundreds of them
on a full disk, one per picture it could not write). Ingest saw only that shards were
missing and said "re-run to retry them", a ``ConnectionError`` the flow retried twice,
filling the same disk each time. Torch-free and img2dataset-free: ``kiln source``
imports ingest too.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

from training.disk import disk_full, free_bytes


def drop_cut_stats(directory: Path) -> list[str]:
    """Remove the ``*_stats.json`` files that do not parse (written on a disk that
    filled as they were): img2dataset takes any stats file as a finished shard and
    would never redo it, and ingest then stopped on a JSON error at every re-run.
    Returns the shard ids whose stats were removed."""
    dropped = []
    for stats in sorted(directory.glob("*_stats.json")):
        try:
            if isinstance(json.loads(stats.read_text()), dict):
                continue
        except (OSError, ValueError):
            pass
        stats.unlink(missing_ok=True)
        dropped.append(stats.name.split("_")[0])
    return dropped


def error(directory: Path, incomplete: list[str], kept: int, shard_bytes: int) -> OSError:
    """The error for the ``incomplete`` shards of ``directory``. When less room is left
    there than one shard takes (``shard_bytes``), a full disk stopped them: a
    ``DiskFull`` naming the folder and the space, and their partial files are removed
    (the disk is left as it was before them; img2dataset writes them anew). Otherwise a
    ``ConnectionError`` (a network fault or a kill), which a retry may get past."""
    names = ", ".join(incomplete[:5]) + (", ..." if len(incomplete) > 5 else "")
    if free_bytes(directory) >= shard_bytes:
        return ConnectionError(
            f"{len(incomplete)} shard(s) did not finish ({names}); "
            f"re-run `kiln ingest` to retry them ({kept} finished shards are kept)"
        )
    for shard in incomplete:
        for part in directory.glob(f"{shard}.*"):
            part.unlink(missing_ok=True)
    return disk_full(
        f"ingest: {len(incomplete)} shard(s) ({names}) could not be written in",
        directory,
        shard_bytes,
        f"free space there and run kiln ingest again ({kept} finished shards are kept)",
        errno.ENOSPC,
    )
