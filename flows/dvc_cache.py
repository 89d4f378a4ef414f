"""DVC's cache on a full disk: a stage that finished is not run again for it, and an
output DVC could not store is not passed over.

After a stage's command, ``dvc repro`` moves its outputs into the cache. With no room
there DVC printed "failed to transfer" and, for a folder output (a model), still exited
0: the flow went on with the output in dvc.lock but not in the cache (``dvc status``:
"not in cache"), so no later checkout or push had it. For a file output it exited 255;
the stage had left no failure note (it had succeeded), so the flow retried it, and the
whole stage ran again from step 0 (a finished stage keeps no checkpoint) to fail the
same way. The cache may be on a disk of its own (``dvc cache dir``, a shared cache).
"""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

from training import paths as P
from training import stages
from training.disk import free_bytes, mount_point


@functools.cache
def cache_dir(root: Path) -> Path:
    """DVC's cache folder for the repository at ``root`` (its config decides)."""
    from dvc.repo import Repo

    repo = Repo(str(root))
    try:
        path = Path(repo.cache.local.path)  # DVC 3 keeps its files in <cache>/files/md5
        return path.parents[1] if path.parts[-2:] == ("files", "md5") else path
    finally:
        repo.close()


def _outs_bytes(root: Path, stage: str) -> int:
    outs = [*stages.BY_NAME[stage].outs, P.METRICS / f"{stage}.json"]
    total = 0
    for out in (root / o for o in outs):
        files = [out] if out.is_file() else out.rglob("*") if out.is_dir() else []
        total += sum(f.stat().st_size for f in files if f.is_file())
    return total


def short_of_room(root: Path, stage: str) -> bool:
    """Less room in DVC's cache than ``stage``'s outputs take: DVC may not have stored
    them (cheap: asked before ``dvc status`` is)."""
    if stage not in stages.BY_NAME:
        return False
    return free_bytes(cache_dir(root)) < _outs_bytes(root, stage)


def uncached(root: Path, stage: str, dvc: list[str]) -> list[str]:
    """``stage``'s outputs that ``dvc status`` finds recorded but not in the cache."""
    proc = subprocess.run(
        [*dvc, "status", "--json", stage], cwd=root, capture_output=True, text=True, check=False
    )
    try:
        status = json.loads(proc.stdout or "{}")
    except ValueError:
        return []
    return [
        path
        for entry in status.get(stage, [])
        if isinstance(entry, dict)
        for path, state in (entry.get("changed outs") or {}).items()
        if state == "not in cache"
    ]


def not_stored(root: Path, stage: str, outs: list[str]) -> str:
    """The one line for a stage whose outputs DVC could not store: where, the room, and
    how to keep this run's work (``dvc commit`` stores the outputs as they are)."""
    cache = cache_dir(root)
    return (
        f"stage {stage} finished, but DVC could not store {', '.join(outs)} in its cache "
        f"{cache} ({free_bytes(cache) / 1e6:.1f} MB free on {mount_point(cache)}): free "
        f"space there, run `dvc commit -f {stage}` to keep this run's output, then run "
        "the pipeline again"
    )
