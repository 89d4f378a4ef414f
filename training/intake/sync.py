"""Incremental ingestion: a re-run fetches only the rows its source gained.

``data/raw`` is the base (a DVC ``persist`` output, so DVC leaves it in place). Every
fetched sample carries a ``row_id``, the identity of its source row:

* a URL list's row: its URL (less a presigned URL's signature) and caption (a web
  server's bytes cannot be known before fetching them);
* a served row (a folder, unpacked shards, a built-in set): its path, caption and the
  sha256 of the file, so an image replaced under the same name is fetched again.

A sync compares the source's rows with the base's successes. Rows already there are
kept as they are (whole shards hard-linked, untouched bytes); rows that left the source
leave the dataset; only the rest are fetched: new rows, and rows that failed last time
(a dead link gets another chance when the source changes). New shards are numbered
after the base's, so keys never collide and kept samples keep theirs (and with them
their train/val split).

What a fetched sample's bytes depend on besides its row (image size, resize mode,
background, limits: ``FETCH_KEYS``) is recorded in the base's report; when it changes,
nothing is kept and the source is fetched again in full. The new ``shards/`` is
assembled beside the old one and swapped in by two renames; a crash between them is
repaired by the next run (``disk.restore_dir``). Memory: one id per base sample (about
100 bytes each), and per source row of a served source (whose rows are listed anyway); a
URL list is planned in record batches (``url_plan``), whatever its length.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from training.config import Params, fingerprint
from training.intake.canonical import unsigned_url
from training.intake.split import CARRIED, carried_splits, split_key

# the ingest params a fetched sample's bytes (or its admission) depend on
FETCH_KEYS = (
    "dataset",
    "image_size",
    "resize_mode",
    "background",
    "png_compression",
    "samples_per_shard",
    "max_bytes",
    "max_pixels",
    "allow_networks",
)
ROW_ID = "row_id"


def fetch_fingerprint(params: Params) -> str:
    c = params.ingest.model_dump(mode="json")
    return fingerprint({k: c[k] for k in FETCH_KEYS})


def _id_bytes(text: str) -> bytes:
    """``text`` as bytes to hash, whatever it holds. A file name that is not UTF-8
    reaches Python with surrogates standing for its bytes (``os.fsdecode``), and a JSON
    url list may spell a lone surrogate (``"\\ud800"``): plain ``encode()`` raises on
    both. ``surrogatepass`` encodes any surrogate and leaves every other string's bytes
    (and so every existing row id) as they were."""
    return text.encode("utf-8", "surrogatepass")


def url_row_id(url: str, caption: str) -> str:
    """A URL list row's id: its URL without a presigned URL's signature
    (``canonical.unsigned_url``: re-signed, the same row is not fetched again), and its
    caption. An unsigned URL's id is what it always was."""
    return hashlib.sha1(_id_bytes(f"url\0{unsigned_url(url)}\0{caption}")).hexdigest()[:24]


def file_digest(file: Path) -> str:
    """The sha256 of a served file: part of its row id, and what img2dataset records
    as the fetched sample's ``sha256`` (the bytes it downloaded are the file's)."""
    h = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_row_id(path: str, caption: str, digest: str) -> str:
    """A served row's id, from its path, caption and file digest (``file_digest``)."""
    return hashlib.sha1(_id_bytes(f"file\0{path}\0{caption}\0{digest}")).hexdigest()[:24]


def carry(shard_dir: Path, ids: list[str], digests: list[str], paths: list[str]) -> dict:
    """Which of a served source's rows keep the split of a picture the base held under
    another name: a row new to the base, at a path no base sample had, whose file's
    sha256 is that of a base sample whose row left the source (a rename; a caption
    edited at the same time too). Without this, a renamed picture's side was drawn
    again from its new path, and a continuing model's training picture could land in
    val. Rows already carried keep their carry, so a second rename, or a full fetch
    after a settings change, keeps the first name's side. Returns row id -> URL."""
    import pyarrow.parquet as pq

    from training.intake.sources import url_path

    if not shard_dir.is_dir():
        return {}
    old = carried_splits(shard_dir)
    base: dict[str, tuple[str, str]] = {}  # row id -> (sha256, the URL it splits by)
    names: set[str] = set()  # the split keys of the base's samples, by their own URLs
    for p in sorted(shard_dir.glob("*.parquet")):
        t = pq.read_table(p)
        if not {ROW_ID, "sha256"} <= set(t.column_names):
            continue  # a base from before row ids: nothing to match
        d = t.select([ROW_ID, "status", "url", "sha256"]).to_pydict()
        for rid, status, url, sha in zip(
            d[ROW_ID], d["status"], d["url"], d["sha256"], strict=True
        ):
            if status == "success" and url:
                names.add(split_key(url, ""))
                base[rid] = (sha, old.get(rid, url))
    source = set(ids)
    gone: dict[str, list[str]] = {}  # sha256 -> URLs of the base's rows that left
    for rid, (sha, url) in sorted(base.items(), key=lambda kv: kv[1][1]):
        if rid not in source:
            gone.setdefault(sha, []).append(url)
    out: dict[str, str] = {}
    for rid, digest, path in zip(ids, digests, paths, strict=True):
        if rid in old:
            out[rid] = old[rid]
            continue
        renamed = rid not in base and split_key(f"kiln://_/{url_path(path)}", "") not in names
        if renamed and gone.get(digest):  # each removed sample lends its side once
            out[rid] = gone[digest].pop(0)
    return out


@dataclass
class Plan:
    """What a sync keeps and fetches. ``fetch`` indexes the source's rows where they
    are held in memory (a served source's); a URL list's are written to the fetch list
    as they are planned (``url_plan``). ``fetching`` counts them either way."""

    fetch: list[int]
    keep: dict[str, set[str]] = field(default_factory=dict)  # base shard id -> keys kept
    rows: dict[str, int] = field(default_factory=dict)  # base shard id -> rows it holds
    kept: int = 0
    removed: int = 0
    retried: int = 0
    next_shard: int = 0  # the first new shard's id
    full: str | None = None  # why nothing could be kept, if so
    carried: dict[str, str] = field(default_factory=dict)  # row id -> URL (``carry``)
    fetching: int = 0  # how many source rows are fetched

    def counts(self) -> dict:
        return {
            "new": self.fetching - self.retried,
            "retried": self.retried,
            "kept": self.kept,
            "removed": self.removed,
            **({"full_reason": self.full} if self.full else {}),
        }


def _base_rows(shard_dir: Path):
    """(shard id, key, status, row_id) of every base sample, shard by shard."""
    import pyarrow.parquet as pq

    for p in sorted(shard_dir.glob("*.parquet")):
        t = pq.read_table(p)
        if ROW_ID not in t.column_names:
            raise LookupError("the base predates incremental ingestion (no row ids)")
        d = t.select(["key", "status", ROW_ID]).to_pydict()
        yield p.stem, d["key"], d["status"], d[ROW_ID]


def base_state(out_dir: Path) -> str:
    """A fingerprint of the base (its shard files' names, sizes and times): a resumed
    fetch belongs to the plan made against this same base."""
    shard_dir = out_dir / "shards"
    files = sorted(shard_dir.glob("*")) if shard_dir.is_dir() else []
    return fingerprint([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def start(params: Params, out_dir: Path) -> tuple[Plan, Matcher | None]:
    """A plan with nothing decided yet, and the matcher that decides each source row in
    turn (None: every row is fetched, ``Plan.full`` says why). Reads the base's parquet
    only; the source's rows are never held, so a URL list is planned batch by batch."""
    report = out_dir / "report.json"
    shard_dir = out_dir / "shards"
    if not shard_dir.is_dir() or not report.is_file():
        return Plan([], full="first ingest"), None
    fetched_with = json.loads(report.read_text()).get("fetch_fingerprint")
    if fetched_with is None:
        return Plan([], full="the base predates incremental ingestion"), None
    if fetched_with != fetch_fingerprint(params):
        why = f"ingest settings changed (one of {', '.join(FETCH_KEYS)})"
        return Plan([], full=why), None
    have: dict[str, list[tuple[str, str]]] = {}
    failed: set[str] = set()
    rows: dict[str, int] = {}
    try:
        for shard, keys, statuses, rids in _base_rows(shard_dir):
            rows[shard] = len(keys)
            for key, status, rid in zip(keys, statuses, rids, strict=True):
                if status == "success":
                    have.setdefault(rid, []).append((shard, key))
                else:
                    failed.add(rid)
    except LookupError as exc:
        return Plan([], full=str(exc)), None
    p = Plan(fetch=[], rows=rows, next_shard=max((int(s) for s in rows), default=-1) + 1)
    return p, Matcher(p, have, failed)


class Matcher:
    """The base's successes matched against the source's rows, one at a time in the
    source's order: a row the base holds is kept (in ``plan.keep``), any other is
    fetched. Holds one entry per base sample, none per source row."""

    def __init__(self, plan: Plan, have: dict, failed: set[str]) -> None:
        self.plan, self.have, self.failed = plan, have, failed
        self.used: Counter = Counter()

    def fetches(self, rid: str) -> bool:
        """Whether the source's next row, of id ``rid``, is fetched (else kept)."""
        spots = self.have.get(rid, ())
        if self.used[rid] < len(spots):  # the same row twice is kept twice if fetched twice
            shard, key = spots[self.used[rid]]
            self.plan.keep.setdefault(shard, set()).add(key)
            self.used[rid] += 1
            return False
        self.plan.fetching += 1
        self.plan.retried += rid in self.failed
        return True

    def finish(self) -> Plan:
        """The plan, with what was kept and what left the source counted."""
        self.plan.kept = sum(self.used.values())
        self.plan.removed = sum(len(v) for v in self.have.values()) - self.plan.kept
        return self.plan


def plan(params: Params, out_dir: Path, ids: list[str]) -> Plan:
    """Match the source's row ids against the base in ``out_dir``; ``fetch`` lists the
    rows to fetch by index."""
    p, match = start(params, out_dir)
    p.fetch = [i for i, rid in enumerate(ids) if match is None or match.fetches(rid)]
    p.fetching = len(p.fetch)
    return match.finish() if match else p


def _rename_key(offset: int, per_shard_digits: int):
    def rename(key: str) -> str:
        return f"{int(key) + offset * 10**per_shard_digits:0{len(key)}d}"

    return rename


def _link_shard(src_dir: Path, shard: str, dst_dir: Path) -> None:
    """A shard kept whole, under its own id: its files linked (copied across devices)."""
    for suffix in (".tar", ".parquet", "_stats.json"):
        src, dst = src_dir / f"{shard}{suffix}", dst_dir / f"{shard}{suffix}"
        if src.exists():
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)


def _copy_shard(src_dir: Path, shard: str, dst_dir: Path, new_id: str, keys, rename) -> None:
    """Shard ``shard`` of ``src_dir`` rewritten as ``new_id`` in ``dst_dir`` with only
    the rows in ``keys`` (None: all), renamed by ``rename``, stats counted again."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from training.intake import shards

    table = pq.read_table(src_dir / f"{shard}.parquet")
    wanted = set(table["key"].to_pylist()) if keys is None else set(keys)
    name = rename or (lambda k: k)

    def move(key: str) -> str | None:
        return name(key) if key in wanted else None

    def edit(ext: str, data: bytes) -> bytes:
        if ext != "json":
            return data
        meta = json.loads(data)
        meta["key"] = name(meta["key"])
        return json.dumps(meta, indent=4).encode("utf-8")

    if (src_dir / f"{shard}.tar").exists():
        shards.sort_tar(src_dir / f"{shard}.tar", dst_dir / f"{new_id}.tar", edit, move)
    table = table.filter(pc.is_in(table["key"], pa.array(sorted(wanted), pa.string())))
    renamed = pa.array([name(k) for k in table["key"].to_pylist()], pa.string())
    table = table.set_column(table.column_names.index("key"), "key", renamed)
    pq.write_table(table, dst_dir / f"{new_id}.parquet")
    stats_src = src_dir / f"{shard}_stats.json"
    stats = json.loads(stats_src.read_text()) if stats_src.exists() else {}
    d = table.select(["status", "error_message"]).to_pydict()
    status = Counter(d["status"])
    reasons = Counter(e or s for s, e in zip(d["status"], d["error_message"], strict=True))
    stats.update(
        count=len(d["status"]),
        successes=status["success"],
        failed_to_download=status["failed_to_download"],
        failed_to_resize=status["failed_to_resize"],
        status_dict=dict(sorted(reasons.items())),
    )
    (dst_dir / f"{new_id}_stats.json").write_text(json.dumps(stats, indent=4))


def assemble(p: Plan, base_dir: Path, new_dir: Path, staged: Path, per_shard: int) -> None:
    """``staged`` = the base's kept rows + the freshly fetched shards in ``new_dir``
    (numbered from ``p.next_shard`` on)."""
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    if p.carried:
        (staged / CARRIED).write_text(json.dumps(p.carried, indent=1, sort_keys=True))
    for shard, keys in sorted(p.keep.items()):
        if len(keys) == p.rows[shard]:  # every row kept: the files as they are
            _link_shard(base_dir, shard, staged)
        else:
            _copy_shard(base_dir, shard, staged, shard, keys, None)
    digits = max(1, math.ceil(math.log10(per_shard)))  # img2dataset's key layout
    for table in sorted(new_dir.glob("*.parquet")):
        shard = table.stem
        if not p.next_shard:  # nothing before them: ids and keys stay
            _link_shard(new_dir, shard, staged)
            continue
        new_id = f"{int(shard) + p.next_shard:0{len(shard)}d}"
        _copy_shard(new_dir, shard, staged, new_id, None, _rename_key(p.next_shard, digits))
