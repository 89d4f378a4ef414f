"""Which copy of an exactly duplicated picture validate keeps: the same one, whatever
the layout of ``data/raw``.

validate keeps the first copy of a picture it reads and rejects the others as
duplicates. A synced ``data/raw`` (``intake/sync.py``) puts every row it fetches again,
an edited caption or a picture replaced under its name, in a new shard after the kept
ones. So when a user edited the caption of a picture that has a copy elsewhere in the
collection, the copy read first became the other one: the edit was rejected as "exact
duplicate of an earlier image", the other copy trained under its old caption, and
where the two names hash to different sides the picture moved between train and val
(found in review: 24 pictures with a copy each, captions edited, 9 changed sides and
none of the 24 edits reached data/clean), although a from-scratch ingest of the same
folder kept every edit and every side.

Here, of the successes whose stored bytes are the same (the ``sha256`` ingest records),
the one whose split key sorts first (the URL path the split hashes, a renamed
picture's first name: ``split.py``) is read before the others, wherever sync put it.
For a folder that is the copy a first ingest reads first (its rows are in path order),
so nothing already split changes side. Copies with the same pixels in other bytes, and
near duplicates, are still judged in read order.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from training.intake import shards
from training.intake.split import split_key


def read_first(paths: list[Path], carried: dict[str, str]) -> dict[Path, set[str]]:
    """{tar: keys} of the copies that must be read before the rest: of each group of
    successes with the same bytes, the one with the lowest split key, where another copy
    of it comes earlier in read order. Reads the shards' parquet tables only, three
    columns (about 150 bytes a sample held, as validate's duplicate index)."""
    import pyarrow.parquet as pq

    first: dict[str, tuple[str, str, Path]] = {}  # sha256 -> (split key, key, tar)
    early: set[str] = set()  # sha256 whose lowest split key is not its first copy read
    for tar in paths:
        table = tar.with_suffix(".parquet")
        if not table.is_file():
            continue
        cols = ["key", "url", "sha256", "status"] + (["row_id"] if carried else [])
        names = pq.read_schema(table).names
        if not {"key", "url", "sha256", "status"} <= set(names):
            continue
        d = pq.read_table(table, columns=[c for c in cols if c in names]).to_pydict()
        ids = d.get("row_id") or [None] * len(d["key"])
        for key, url, sha, status, rid in zip(
            d["key"], d["url"], d["sha256"], d["status"], ids, strict=True
        ):
            if status != "success" or not sha:
                continue
            rank = split_key(carried.get(rid or "", url or ""), key)
            seen = first.get(sha)
            if seen is None:
                first[sha] = (rank, key, tar)
            elif rank < seen[0]:
                first[sha] = (rank, key, tar)
                early.add(sha)
    out: dict[Path, set[str]] = {}
    for sha in early:
        _, key, tar = first[sha]
        out.setdefault(tar, set()).add(key)
    return out


def ordered(paths: list[Path], carried: dict[str, str]) -> Iterator[shards.Record]:
    """The raw samples of ``paths``, in read order but for the copies ``read_first``
    names, which come first (read from their own shards only)."""
    promoted = read_first(paths, carried)
    keys = set().union(*promoted.values()) if promoted else set()
    if keys:
        for rec in shards.read(sorted(promoted)):
            if rec.key in keys:
                yield rec
    for rec in shards.read(paths):
        if rec.key not in keys:
            yield rec
