"""What a source kind hands to ingest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from training.config import Params
from training.intake.sources import SourceError


@dataclass
class Prepared:
    """A source made fetchable: either ``url_list``, a normalised URL list (url,
    caption) that img2dataset downloads as it is, or ``folder`` and its ``rows`` (path,
    caption[, meta]), which ingest serves on loopback and fetches the same way."""

    url_list: Path | None = None
    folder: Path | None = None
    rows: list[dict] = field(default_factory=list)
    extra_cols: list[str] | None = None  # row columns kept with each sample (e.g. meta)
    report: dict = field(default_factory=dict)  # added to ingest's report.json


def require_source(params: Params) -> str:
    """``ingest.source``, or one line saying how to give it."""
    c = params.ingest
    if not c.source:
        raise SourceError(
            f"ingest.dataset is {c.dataset!r} but ingest.source is not set "
            "(give --url-list, --folder or --shards, or set ingest.source in params.yaml)"
        )
    return c.source
