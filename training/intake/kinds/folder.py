"""A local folder of images with sidecar ``.txt`` captions (subfolders too)."""

from __future__ import annotations

from pathlib import Path

from training.config import Params
from training.console import say
from training.intake import sources
from training.intake.kinds.base import Prepared, require_source


def check(params: Params) -> None:
    sources.check_folder(Path(require_source(params)))


def identity(params: Params) -> list:
    """Names (relative), sizes and modification times of every file: a changed, added or
    removed file is a different source. Reads no image, so it is cheap to ask often."""
    root = Path(params.ingest.source)
    return [
        (p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns)
        for p in sources.folder_files(root)
        if (st := p.stat())
    ]


def prepare(params: Params, work_dir: Path) -> Prepared:
    folder = Path(params.ingest.source)
    rows = sources.folder_rows(folder)
    say(f"ingest: {len(rows)} images in {folder}")
    return Prepared(folder=folder, rows=rows)
