"""Reproducible ingest output: one shard's bytes depend only on its source rows.

img2dataset writes a shard's samples in the order their downloads finish, and stamps tar
members and stats with the time. Before publishing, every shard is rewritten in key
order with fixed tar metadata, its parquet sorted by key and its stats stripped of
timings; the loopback URLs of served sources (``http://127.0.0.1:<random port>/path``)
are recorded as ``kiln://<dataset>/path``.

It also holds the stable names a source row is known by (its row id, its train/val
side): a URL without its signature (``unsigned_url``) and a shard by one spelling of
its path (``shard_spelling``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote_plus, urlsplit

# img2dataset's per-shard stats that change from run to run of the same data
_VOLATILE_STATS = ("duration", "start_time", "end_time")


# Signed-URL schemes: (the names whose presence says a query is signed this way, the
# names then dropped). Each set changes every time the URL is signed and none of them
# names a different object. Lower case: names match case-insensitively.
_SIGNING: tuple[tuple[frozenset[str], frozenset[str]], ...] = tuple(
    (frozenset(need.split()), frozenset(drop.split()))
    for need, drop in (
        # AWS S3 Signature Version 4 (query-string auth)
        (
            "x-amz-signature",
            "x-amz-algorithm x-amz-credential x-amz-date x-amz-expires "
            "x-amz-signedheaders x-amz-signature x-amz-security-token",
        ),
        # AWS S3 Signature Version 2
        ("awsaccesskeyid signature", "awsaccesskeyid signature expires x-amz-security-token"),
        # Google Cloud Storage V4, and V2
        (
            "x-goog-signature",
            "x-goog-algorithm x-goog-credential x-goog-date x-goog-expires "
            "x-goog-signedheaders x-goog-signature",
        ),
        ("googleaccessid signature", "googleaccessid signature expires"),
        # CloudFront signed URLs (canned and custom policy)
        ("key-pair-id signature", "policy key-pair-id signature expires"),
        # Azure shared access signatures: service, account and user delegation SAS
        (
            "sv sig",
            "sv ss srt sp se st sip spr si sr sdd ses sig skoid sktid skt ske sks skv "
            "saoid suoid scid",
        ),
    )
)


def public_source(source: str | None) -> str | None:
    """A source as Kiln records it (MLflow params and tags, the model card,
    data/source.json): a signed URL without its signature, which anyone who can read
    the registry could otherwise use until it expires (runs and versions are readable
    by every account of a shared server). Rows are keyed the same way (``unsigned_url``)."""
    return unsigned_url(source) if isinstance(source, str) else source


def public_params(params: dict) -> dict:
    """A params dict (``Params.to_dict()``) as Kiln records it: ``ingest.source`` through
    ``public_source`` (the run's config artifact, resolved_params.json, the card)."""
    ingest = params.get("ingest")
    if isinstance(ingest, dict) and isinstance(ingest.get("source"), str):
        return {**params, "ingest": {**ingest, "source": public_source(ingest["source"])}}
    return params


def unsigned_url(url: str) -> str:
    """``url`` without the query parameters that sign it (presigned S3, GCS, CloudFront
    and Azure SAS URLs), for what names a row: its id and its train/val key. A presigned
    URL changes every time it is signed; keyed on the whole URL, the same picture was
    fetched again on every ingest and drawn into train or val again.

    Only well-known signing sets are dropped, and a set only when its signature itself
    is in the query (``X-Amz-Signature``; ``sv`` and ``sig`` for a SAS): ``?id=17``
    can name another picture, and short names like ``st`` or ``sp`` are a signature's
    only beside one. A parameter outside these sets stays, even one that looks
    volatile: dropping it could merge two pictures into one row. Names match
    case-insensitively. A URL with nothing to drop is returned unchanged, character
    for character, so every existing row id and split key stays as it was."""
    rest, hash_, fragment = url.partition("#")
    base, question, query = rest.partition("?")
    if not query:
        return url
    pieces = query.split("&")
    names = [unquote_plus(p.partition("=")[0]).lower() for p in pieces]
    present = set(names)
    drop: set[str] = set()
    for need, names_of_set in _SIGNING:
        if need <= present:
            drop |= names_of_set
    if not drop & present:
        return url
    kept = "&".join(p for p, n in zip(pieces, names, strict=True) if n not in drop)
    return base + (question + kept if kept else "") + hash_ + fragment


def shard_spelling(shard: str) -> str:
    """One spelling per shard, for what names its samples (the folder it unpacks into,
    and with it their row ids and train/val keys). A URL loses its signature
    (``unsigned_url``). A path is normalised (``./a.tar``, ``wds//a.tar``) and, when
    absolute and under the working directory (the repository root, where DVC runs
    stages), made relative to it: ``data/wds/a.tar``, ``./data/wds/a.tar`` and
    ``/repo/data/wds/a.tar`` are one shard, in any checkout.

    Normalised relative paths and absolute paths outside the working directory, the
    usual spellings, are kept as they are, so existing samples keep their ids and their
    side of the split; the price is that ``../x/a.tar`` and its absolute spelling stay
    two names. Lexical, not ``realpath``: a shard reached through a symlinked folder
    keeps the name it had."""
    if "://" in shard:
        return unsigned_url(shard)
    path = os.path.normpath(shard)
    if os.path.isabs(path):
        inside = os.path.relpath(path, os.getcwd())
        if inside != os.pardir and not inside.startswith(os.pardir + os.sep):
            return inside
    return path


def stable_url(dataset: str) -> Callable[[str], str]:
    """How a recorded URL is rewritten: sources Kiln serves itself (built-in sets,
    folders, unpacked shards) are fetched from ``http://127.0.0.1:<random port>``, so
    their URLs become ``kiln://<dataset>/<path>``. The path, which is what the train/val
    split hashes (``validate.split_key``), is kept as it was. A URL list's own URLs are
    kept but for their signatures (``unsigned_url``): a presigned URL carries its
    credential (``X-Amz-Credential``, a session token) into data/raw, the rejects table
    and the DVC remote they are pushed to, and it expires anyway; every name a row goes
    by is the unsigned one."""
    if dataset == "url-list":
        return unsigned_url

    def fix(url: str) -> str:
        if not url:
            return url
        parts = urlsplit(url)
        return f"kiln://{dataset}{parts.path}" + (f"?{parts.query}" if parts.query else "")

    return fix


def canonicalize_shard(shard_dir: Path, shard_id: str, fix_url: Callable[[str], str]) -> None:
    """Make one finished img2dataset shard depend only on its source rows: tar samples
    and parquet rows in key order, fixed tar metadata, stable URLs, stats without
    timings. Each file is replaced atomically and the rewrite is idempotent, so an
    interrupted publish can simply run it again."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from training.intake import shards

    def edit(ext: str, data: bytes) -> bytes:
        if ext != "json":
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
        if "url" in table.column_names:
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
