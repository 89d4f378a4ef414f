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
    """Names, sizes and modification times: a changed file is a different source."""
    return [
        (str(p), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(Path(params.ingest.source).rglob("*"))
        if p.is_file()
    ]


def prepare(params: Params, work_dir: Path) -> Prepared:
    folder = Path(params.ingest.source)
    rows = sources.folder_rows(folder)
    say(f"ingest: {len(rows)} images in {folder}")
    return Prepared(folder=folder, rows=rows)
