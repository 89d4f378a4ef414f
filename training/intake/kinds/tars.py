"""Existing webdataset tars (a path, a glob, a brace pattern, or http(s) URLs fetched
through the fetch guard), unpacked shard by shard and then ingested as a folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from training.config import Params
from training.console import say
from training.intake import sources, unpack
from training.intake.guard import policy_for
from training.intake.kinds.base import Prepared, require_source


def check(params: Params) -> None:
    sources.expand_shards(require_source(params))  # refuses pipe: and empty patterns


def identity(params: Params) -> list:
    """The shard list; a local shard with its size and modification time. A remote
    shard is known by its URL only: one rewritten in place is not noticed (name shards
    immutably, as webdataset collections do)."""
    out: list = []
    for item in sources.expand_shards(params.ingest.source or ""):
        path = Path(item)
        if "://" not in item and path.is_file():
            st = path.stat()
            out.append((item, st.st_size, st.st_mtime_ns))
        else:
            out.append(item)
    return out


def unpacked_dir(work_dir: Path) -> Path:
    """Where the shards are unpacked: beside the work folder, not in it. The work folder
    goes when an ingest publishes, and with the unpacked shards in it every sync
    downloaded and unpacked every shard of the source again to fetch the few rows of
    one new shard (a remote collection of 1,000 tars: 1,000 downloads a day). Kept, a
    sync unpacks only the shards it has not seen (``unpack.unpack_shards``); the price
    is a second copy of the collection on disk, which may be deleted at any time."""
    return work_dir.parent / f".{work_dir.name}-unpacked"


def prepare(params: Params, work_dir: Path) -> Prepared:
    c = params.ingest
    folder = unpacked_dir(work_dir)
    # whole tars, not images: the per-image byte cap and deadline do not apply
    remote = dataclasses.replace(policy_for(params), max_bytes=1 << 40, deadline_s=3600.0)
    stats = unpack.unpack_shards(c.source, folder, remote)
    say(f"ingest: unpacked {stats['shards']} shards from {c.source}")
    try:
        rows = sources.folder_rows(folder, own=(unpack.DONE,))
    except sources.SourceError:
        raise sources.SourceError(
            f"shards {c.source}: no image members ({', '.join(sources.IMAGE_SUFFIXES)})"
        ) from None
    say(f"ingest: {len(rows)} images in {folder}")
    return Prepared(folder=folder, rows=rows, report={"unpacked": stats})
