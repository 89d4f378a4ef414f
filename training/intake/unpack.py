"""Webdataset tars unpacked into a folder of ``<key>.<ext>`` files (``sources.folder_rows``
then reads it like any folder of images).

A shard cut short (a download the network ended early, a copy that did not finish) must
not pass for a smaller shard: tarfile ends at the first missing header without a word,
and raises a bare ``ReadError`` mid-member. Both are caught here and said, naming the
shard: a remote shard's as a network fault (``ConnectionError``: the stage is retried),
a local one's as ``SourceError`` (the file itself is broken; no retry mends it).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import tarfile
import zlib
from pathlib import Path

from training.console import say
from training.intake.sources import (
    IMAGE_SUFFIXES,
    UNSAFE_SUFFIXES,
    SourceError,
    expand_shards,
    shard_folder,
)

DONE = ".unpacked"  # marker file in a shard's folder: unpacked whole, not unpacked again
_BROKEN = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


class ShardCut(Exception):
    """A tar that ends before its end-of-archive marker; the message says where."""


def unpack_shards(spec: str, dest: Path, policy) -> dict:
    """Unpack webdataset tars into ``dest`` as ``<shard>/<key>.<ext>`` + ``.txt``.

    Remote shards are downloaded through the fetch guard; a shard already unpacked
    (marker file) is skipped, so an interrupted unpack resumes, and ``dest`` kept from
    the last ingest (``kinds.tars``) makes a sync download and unpack only the shards
    the source gained. The marker records the shard it was made from (``_identity``):
    a local tar rewritten in place is unpacked again."""
    from tqdm import tqdm

    from training.intake import guard as fetch

    shards = expand_shards(spec)
    stats = {"shards": len(shards), "ignored_unsafe_members": 0, "ignored_other_members": 0}
    other_example = ""
    names = [shard_folder(shard) for shard in shards]
    # a shard no longer in the source takes its pictures with it (sync then drops their
    # rows); so does a folder of an older Kiln's positional names
    if dest.is_dir():
        for old in dest.iterdir():
            if old.name not in names:
                (shutil.rmtree if old.is_dir() else Path.unlink)(old)
    for shard, name in zip(tqdm(shards, desc="unpack shards", unit="shard"), names, strict=True):
        target = dest / name
        done = target / DONE
        marker = json.loads(done.read_text()) if done.exists() else None
        if marker is not None and marker.get("shard") == _identity(shard):
            for k in ("ignored_unsafe_members", "ignored_other_members"):
                stats[k] += marker.get(k, 0)  # the report counts every shard, kept or not
            other_example = other_example or marker.get("other_example", "")
            continue
        shutil.rmtree(target, ignore_errors=True)  # another shard's files, or half of one
        target.mkdir(parents=True)
        remote = "://" in shard
        if remote:
            try:
                body, _ = fetch.fetch_bytes(shard, 60, policy)
            except Exception as exc:  # noqa: BLE001 - one clear line, whatever went wrong
                why = fetch.reason(exc)
                if fetch.is_transient(why):  # the network's fault: a retry may succeed
                    raise ConnectionError(f"shard {shard}: {why}") from None
                raise SourceError(f"shard {shard}: {why}") from None
            local = dest / f"{name}.tar"  # removed once unpacked
            local.write_bytes(body)
        else:
            local = Path(shard)
            if not local.is_file():
                raise SourceError(f"shard {shard} does not exist")
        try:
            counts = _unpack_one(local, target)
        except ShardCut as exc:
            if remote:  # served whole it would not be: fetch it again
                raise ConnectionError(f"shard {shard}: download cut short ({exc})") from None
            raise SourceError(
                f"shard {shard} is cut short ({exc}): copy it again whole, or take it "
                "out of ingest.source"
            ) from None
        finally:
            if remote:
                local.unlink(missing_ok=True)
        other_example = other_example or counts.get("other_example", "")
        for k in ("ignored_unsafe_members", "ignored_other_members"):
            stats[k] += counts[k]
        done.write_text(json.dumps({**counts, "shard": _identity(shard)}))
    if stats["ignored_other_members"]:
        say(
            f"ingest: {stats['ignored_other_members']} tar members left out: their "
            f"webdataset extension (the name after the first dot, e.g. {other_example!r}) "
            f"is not an image ({', '.join(IMAGE_SUFFIXES)}) nor txt; rename such members "
            "so that the only dot is the extension's (cat_v2.jpg + cat_v2.txt)"
        )
    return stats


def _identity(shard: str) -> list | None:
    """What says an unpacked shard is still the source's: a local tar's size and
    modification time. A remote shard is known by its URL, as the source's identity
    knows it (``kinds.tars.identity``: name shards immutably). A local path that is no
    file matches no marker, and is then refused by name."""
    if "://" in shard:
        return None
    path = Path(shard)
    if not path.is_file():
        return ["missing"]
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _unpack_one(tar_path: Path, target: Path) -> dict:
    """Group members by webdataset key (path up to the first dot of the file name).
    Raises ShardCut when the tar ends early, SourceError when it is no tar at all."""
    counts: dict = {"ignored_unsafe_members": 0, "ignored_other_members": 0}
    try:
        tf = tarfile.open(tar_path, "r")  # noqa: SIM115 - closed by the with below
    except _BROKEN as exc:
        # tarfile's message lists every compression it tried, one per line: keep what
        # the plain tar reader said
        found = re.search(r"method tar: \w+\('([^']*)'\)", str(exc))
        why = found.group(1) if found else str(exc).strip().splitlines()[0]
        raise SourceError(f"{tar_path}: not a tar shard ({why})") from None
    members = 0
    with tf:
        try:
            for m in tf:
                members += 1
                if not m.isfile():
                    continue
                dirname, _, fname = m.name.rpartition("/")
                stem, dot, ext = fname.partition(".")
                ext = "." + ext.lower() if dot else ""
                if ext in UNSAFE_SUFFIXES:
                    counts["ignored_unsafe_members"] += 1
                    continue
                if ext not in IMAGE_SUFFIXES and ext != ".txt":
                    counts["ignored_other_members"] += 1
                    counts.setdefault("other_example", m.name)
                    continue
                # a key's files keep their names, flattened to one safe file name
                key = hashlib.sha1(f"{dirname}/{stem}".encode()).hexdigest()[:16]
                fh = tf.extractfile(m)
                data = fh.read() if fh is not None else None
                if data is not None:
                    (target / f"{key}{ext}").write_bytes(data)
            # iteration also ends, silently, at a header that is missing or garbage:
            # a whole tar has its end-of-archive block (512 zero bytes) there instead
            tf.fileobj.seek(tf.offset)
            end = tf.fileobj.read(512)
        except _BROKEN as exc:
            raise ShardCut(f"{exc} in member {members}") from None
        if end != bytes(512):
            raise ShardCut(f"no end-of-archive block after member {members}")
    return counts
