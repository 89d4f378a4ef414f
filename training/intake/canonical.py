"""Reproducible ingest output: one shard's bytes depend only on its source rows.

img2dataset writes a shard's samples in the order their downloads finish, and stamps tar
members and stats with the time. Before publishing, every shard is rewritten in key
order with fixed tar metadata, its parquet sorted by key and its stats stripped of
timings; the loopback URLs of served sources (``http://127.0.0.1:<random port>/path``)
are recorded as ``kiln://<dataset>/path``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

# img2dataset's per-shard stats that change from run to run of the same data
_VOLATILE_STATS = ("duration", "start_time", "end_time")


def stable_url(dataset: str) -> Callable[[str], str] | None:
    """How a recorded URL is rewritten: sources Kiln serves itself (built-in sets,
    folders, unpacked shards) are fetched from ``http://127.0.0.1:<random port>``, so
    their URLs become ``kiln://<dataset>/<path>``. The path, which is what the train/val
    split hashes (``validate.split_key``), is kept as it was. A URL list's own URLs are
    kept (None)."""
    if dataset == "url-list":
        return None

    def fix(url: str) -> str:
        if not url:
            return url
        parts = urlsplit(url)
        return f"kiln://{dataset}{parts.path}" + (f"?{parts.query}" if parts.query else "")

    return fix


def canonicalize_shard(
    shard_dir: Path, shard_id: str, fix_url: Callable[[str], str] | None
) -> None:
    """Make one finished img2dataset shard depend only on its source rows: tar samples
    and parquet rows in key order, fixed tar metadata, stable URLs, stats without
    timings. Each file is replaced atomically and the rewrite is idempotent, so an
    interrupted publish can simply run it again."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from training.intake import shards

    def edit(ext: str, data: bytes) -> bytes:
        if ext != "json" or fix_url is None:
            return data
        meta = json.loads(data)
        if isinstance(meta.get("url"), str):
            meta["url"] = fix_url(meta["url"])
        return json.dumps(meta, indent=4).encode("utf-8")  # img2dataset's own layout

    tar = shard_dir / f"{shard_id}.tar"
    if tar.exists():
        tmp = tar.with_name(f".{tar.name}.tmp")
        shards.sort_tar(tar, tmp, edit)
        os.replace(tmp, tar)
    table_path = shard_dir / f"{shard_id}.parquet"
    if table_path.exists():
        table = pq.read_table(table_path)
        table = table.take(pc.sort_indices(table, [("key", "ascending")]))
        if fix_url is not None and "url" in table.column_names:
            urls = [fix_url(u) if u is not None else None for u in table["url"].to_pylist()]
            i = table.column_names.index("url")
            table = table.set_column(i, table.schema.field(i), pa.array(urls, pa.string()))
        tmp = table_path.with_name(f".{table_path.name}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, table_path)
    stats_path = shard_dir / f"{shard_id}_stats.json"
    if stats_path.exists():
        stats = json.loads(stats_path.read_text())
        for k in _VOLATILE_STATS:
            stats.pop(k, None)
        stats["status_dict"] = dict(sorted(stats.get("status_dict", {}).items()))
        tmp = stats_path.with_name(f".{stats_path.name}.tmp")
        tmp.write_text(json.dumps(stats, indent=4))
        os.replace(tmp, stats_path)
