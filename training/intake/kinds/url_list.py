"""A URL list: a parquet/csv/tsv/jsonl file of image URLs and captions, downloaded by
img2dataset through the fetch guard."""

from __future__ import annotations

import hashlib
from pathlib import Path

from training.config import Params
from training.console import say
from training.intake import sources
from training.intake.kinds.base import Prepared, require_source


def check(params: Params) -> None:
    sources.check_url_list(Path(require_source(params)))


def identity(params: Params) -> list:
    """The file's bytes: an edited list is a different source."""
    h = hashlib.sha256()
    with open(params.ingest.source, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return [h.hexdigest()]


def prepare(params: Params, work_dir: Path) -> Prepared:
    c = params.ingest
    url_list = work_dir / "urls.parquet"
    n = sources.normalize_url_list(Path(c.source), c.url_col, c.caption_col, url_list)
    say(f"ingest: {n} rows in {c.source}; downloading with img2dataset")
    return Prepared(url_list=url_list)
