"""Where a split's bytes come from: a local directory, or an S3-compatible object store
read through a bounded on-disk cache.

Local shards are read where they lie. ``s3://bucket/prefix`` shards are downloaded with
boto3 into ``cache_dir``, named by their sha256 (so a re-published split is never served
stale bytes, and two splits sharing a shard share its file), verified, and evicted least
recently used first to keep the cache under ``limit`` bytes. Each download goes through
a hidden ``.<name>.<pid>.<thread>.tmp`` file Kiln opens itself; one that a kill cut short
is removed by the next run (boto3's ``download_file`` named its own partial files, which
stayed on disk for good, outside the budget). The endpoint and credentials are boto3's
usual ones (``AWS_ENDPOINT_URL`` for MinIO or any other S3-compatible store,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or a profile); none of them is ever
written by Kiln. Where the bytes come from is not a parameter: the same split streamed
from S3 trains bitwise the same weights as from local disk (``tests/test_stream_s3.py``).
A request that fails is one line naming its ``s3://`` object (``store_errors``): access
refused or no credentials, a ``UserError`` (check the ``AWS_*`` credentials and
``AWS_ENDPOINT_URL``); no answer after boto3's retries, a ``ConnectionError`` the flow
retries; a missing object, ``MissingShard``; a full cache disk, ``DiskFull``.

The environment says where the data lives, so moving it re-runs nothing:

* ``KILN_DATA_REMOTE``: ``s3://bucket/prefix`` holding ``clean/`` and ``latents/`` as
  ``kiln publish`` uploads them; unset, training reads ``data/`` on local disk;
* ``KILN_CACHE_DIR`` (default ``data/cache``) and ``KILN_CACHE_LIMIT`` (bytes, or with a
  unit: ``500MB``, ``20GB``; default 10 GB): per node, shared out between the processes
  torchrun starts on it (``LOCAL_WORLD_SIZE``).

Each process keeps its files in a directory of its own, ``<host>-<LOCAL_RANK>``, which
it holds (an exclusive ``flock`` on its ``.lock``) until it ends; a second process that
finds it held, such as a stage run by hand beside another, takes ``<host>-<rank>-1``
(then ``-2``, ...), and the next run takes the first again with its files. The limit
applies per process directory: two stages side by side may hold twice it on disk.
The files an earlier run left there are adopted, and checked against the index (size,
then sha256) the first time this process hands each out: a copy cut short or with a
flipped bit is fetched again. Files this process downloaded were checked as they came.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import re
import socket
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from training.console import say
from training.disk import DiskFull, disk_full_code, free_bytes
from training.errors import UserError
from training.intake.index import INDEX, ShardEntry, SplitIndex, file_sha256, parse_index
from training.intake.store_errors import MissingShard, not_found, store_error

REMOTE_ENV, CACHE_DIR_ENV, CACHE_LIMIT_ENV = (
    "KILN_DATA_REMOTE",
    "KILN_CACHE_DIR",
    "KILN_CACHE_LIMIT",
)
DEFAULT_CACHE_DIR, DEFAULT_CACHE_LIMIT = "data/cache", 10 * 10**9
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text.upper())
    if not m:
        raise UserError(f"{CACHE_LIMIT_ENV}={text!r}: expected bytes, e.g. 500MB or 20GB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def is_remote(url: str) -> bool:
    return url.startswith("s3://")


def split_url(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://") :].partition("/")
    return bucket, key


def s3_client():
    """boto3's S3 client, configured the usual way (AWS_ENDPOINT_URL, credentials chain).
    Each request is tried 6 times (5 retries, backing off), or AWS_MAX_ATTEMPTS in all."""
    import boto3
    from botocore.config import Config

    retries = {"mode": "standard"}
    if not os.environ.get("AWS_MAX_ATTEMPTS"):
        retries["max_attempts"] = 5
    return boto3.client("s3", config=Config(retries=retries))


def split_source(local: Path, relative: str) -> str:
    """Where a split is read from: ``$KILN_DATA_REMOTE/<relative>`` if set, else ``local``."""
    remote = os.environ.get(REMOTE_ENV, "").strip()
    if not remote:
        return str(local)
    if not is_remote(remote):
        raise UserError(f"{REMOTE_ENV}={remote!r}: expected s3://bucket/prefix")
    return f"{remote.rstrip('/')}/{relative}"


class Store:
    """Local paths for a split's shards (see the module docstring). One per process and
    cache (``Store.shared()``), so every split a stage reads shares one budget."""

    _shared: dict[tuple[Path, int], Store] = {}

    @classmethod
    def shared(cls) -> Store:
        """This process's store for the cache the environment names."""
        root = Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).absolute()
        env = os.environ.get(CACHE_LIMIT_ENV)
        key = (root, parse_bytes(env) if env else DEFAULT_CACHE_LIMIT)
        if key not in cls._shared:
            cls._shared[key] = cls(*key)
        return cls._shared[key]

    def __init__(self, root: Path, limit: int):
        # One cache directory per process, named by host and local rank: a node's
        # processes never wait for, or evict under, one another (the limit is shared
        # out), and nodes that share a data/ folder keep apart. torchrun's variables are
        # read here, not through the engine, so publishing stays torch-free. Held for
        # the process's life (``_claim``): no other process evicts under it.
        host = socket.gethostname()
        self.dir, self._hold = _claim(Path(root), f"{host}-{os.environ.get('LOCAL_RANK', '0')}")
        self.limit = limit // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        self._files: OrderedDict[Path, int] = OrderedDict()  # LRU of cached files
        self._pinned: dict[object, set[Path]] = {}  # a reader's shards in use: evicted last
        self._lock = threading.Lock()
        self._busy: dict[Path, threading.Event] = {}
        self._reserved = 0  # bytes of downloads in flight
        self._client = None
        # files an earlier run left: adopted oldest first, then trimmed to the limit;
        # unchecked until first handed out (``_intact``)
        old = [p for p in self.dir.glob("*/*") if p.is_file() and not p.name.startswith(".")]
        for p in sorted(old, key=lambda p: p.stat().st_mtime):
            self._files[p] = p.stat().st_size
        self._unchecked = set(self._files)
        # downloads a killed run left half-done: ``.<name>.<pid>.<thread>.tmp``, and
        # ``...tmp.<8 random chars>``, the partial files of boto3's download_file
        for p in self.dir.glob("*/.*.tmp*"):
            p.unlink(missing_ok=True)
        self._evict(keep=None)

    # ---- the index ------------------------------------------------------------------
    def index(self, source: str) -> SplitIndex:
        """The split at ``source`` (a directory or ``s3://`` prefix), checked against the
        store before any training starts: every listed shard must be there at its size."""
        where = f"{source.rstrip('/')}/{INDEX}"
        if not is_remote(source):
            path = Path(source) / INDEX
            if not path.is_file():
                raise UserError(f"{path}: no split index (re-run the stage that writes it)")
            idx = parse_index(path.read_text(), source, where)
            missing = [s.url for s in idx.shards if not (Path(source) / s.url).is_file()]
            self._check_missing(missing, where)
            return idx
        text = self.read_bytes(where).decode()
        idx = parse_index(text, source, where)
        sizes = self._listing(source)
        self._check_missing([s.url for s in idx.shards if s.url not in sizes], where)
        wrong = [s.url for s in idx.shards if sizes[s.url] != s.filesize]
        if wrong:
            raise UserError(
                f"{where}: shards differ in size from the index: {', '.join(wrong[:5])}"
            )
        return idx

    def _listing(self, prefix: str) -> dict[str, int]:
        bucket, key = split_url(prefix.rstrip("/") + "/")
        sizes: dict[str, int] = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=key
            ):
                for obj in page.get("Contents", []):
                    sizes[obj["Key"][len(key) :]] = obj["Size"]
        except Exception as exc:
            self._failed(exc, f"s3://{bucket}/{key}")
            raise
        return sizes

    @staticmethod
    def _check_missing(missing: list[str], where: str) -> None:
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise MissingShard(
                f"{where}: {len(missing)} listed shard(s) missing from the store: "
                f"{', '.join(missing[:5])}{more}"
            )

    def read_bytes(self, url: str) -> bytes:
        """A small file (an index, a manifest) from a local path or the store."""
        if not is_remote(url):
            return Path(url).read_bytes()
        bucket, key = split_url(url)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            if not_found(exc):
                raise MissingShard(f"{url}: not in the store (was it published?)") from None
            self._failed(exc, url)
            raise

    @property
    def client(self):
        if self._client is None:
            self._client = s3_client()
        return self._client

    def _failed(self, exc: Exception, url: str) -> None:
        """Raise ``exc``, boto3's reading ``url``, as one line naming it (``store_errors``);
        return if it is not the store's (the caller re-raises it as it is)."""
        endpoint = self._client.meta.endpoint_url if self._client is not None else None
        error = store_error(exc, url, endpoint)
        if error is not None:
            raise error from exc

    def check_fits(self, idx: SplitIndex, block_shards: int, bucketed: bool = True) -> None:
        """Fail before training if the blocks in use at once exceed the cache: two blocks
        of the largest shards (the one being read and the next), two per bucket in a
        split of aspect-ratio buckets (whose batches interleave, each bucket reading its
        own blocks)."""
        if not is_remote(idx.base):
            return
        blocks = idx.blocks_in_use(bucketed)
        sizes = sorted((s.filesize for s in idx.shards), reverse=True)
        need = sum(sizes[: blocks * block_shards])
        if need > self.limit:
            raise UserError(
                f"the shard cache ({self.limit / 1e6:.1f} MB per process, {CACHE_LIMIT_ENV}) "
                f"cannot hold {blocks} blocks of shards ({need / 1e6:.1f} MB): raise "
                f"{CACHE_LIMIT_ENV} or lower the stage's block_shards"
            )

    # ---- shards ---------------------------------------------------------------------
    def _local(self, entry: ShardEntry) -> Path:
        return self.dir / entry.sha256[:2] / f"{entry.sha256}{Path(entry.url).suffix}"

    def pin(self, owner: object, idx: SplitIndex, shards: Iterable[int]) -> None:
        """``owner``'s shards in use (a streamed split's current and next blocks, one pair
        per aspect-ratio bucket): evicted only when nothing else is left to evict. Plain
        LRU evicted them first in a split of buckets (a bucket's next block, fetched
        early and not yet read, can be the least recently used file): an epoch of 3
        buckets of 18 shards fetched 3 shards twice through the cache it is budgeted."""
        with self._lock:
            self._pinned[owner] = {self._local(idx.shards[i]) for i in shards}

    def unpin(self, owner: object) -> None:
        with self._lock:
            self._pinned.pop(owner, None)

    def path(self, idx: SplitIndex, i: int, on_download=None) -> Path:
        """A local path of shard ``i``, downloading it if it lives in object storage
        (then ``on_download(bytes)`` is called). A listed file that is gone (deleted
        by hand; by another process, before directories were held) is fetched again:
        trusted, it was a FileNotFoundError. So is an earlier run's copy that is
        damaged (``_intact``)."""
        if not is_remote(idx.base):
            return Path(idx.url(i))
        entry = idx.shards[i]
        local = self._local(entry)
        while True:
            with self._lock:
                event = self._busy.get(local)
                if event is None:
                    if local in self._files and local not in self._unchecked and local.exists():
                        self._files.move_to_end(local)
                        return local
                    adopted = local in self._unchecked
                    event = self._busy[local] = threading.Event()
                    break
            event.wait()  # another thread is fetching (or checking) it
        reserved = 0
        try:
            if adopted and self._intact(local, entry):
                with self._lock:
                    self._unchecked.discard(local)
                    if local in self._files:  # not evicted while it was read
                        self._files.move_to_end(local)
                        return local
            with self._lock:
                if self._files.pop(local, None) is not None:  # damaged, or gone
                    self._unchecked.discard(local)
                    local.unlink(missing_ok=True)
                reserved = entry.filesize
                self._reserved += reserved
                self._evict(keep=None)  # room for it, and for every download in flight
            self._download(idx.url(i), entry, local)
            with self._lock:
                self._files[local] = entry.filesize
        finally:
            with self._lock:
                self._reserved -= reserved
                self._busy.pop(local).set()
        if on_download is not None:
            on_download(entry.filesize)
        return local

    def _intact(self, local: Path, entry: ShardEntry) -> bool:
        """Whether an earlier run's copy still matches the index (size, then sha256).
        Found in review: a copy cut short or with a flipped bit (a crash before the
        disk's writeback, a failing disk) was adopted unread, and the loader dropped the
        good shard for the rest of the run."""
        try:
            if local.stat().st_size == entry.filesize and file_sha256(local) == entry.sha256:
                return True
        except FileNotFoundError:  # evicted meanwhile, or deleted
            return False
        say(f"shard cache: {local} differs from {entry.url} in the index; fetching it again")
        return False

    def _download(self, url: str, entry: ShardEntry, local: Path) -> None:
        """``url`` into ``local``, through a temporary file Kiln names and opens itself
        (found in review: boto3's ``download_file`` wrote to ``<name>.<8 random chars>``,
        which the startup clean-up never matched, so a download cut by a kill stayed on
        disk for good, outside the budget)."""
        tmp = local.with_name(f".{local.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        bucket, key = split_url(url)
        try:
            local.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                self.client.download_fileobj(bucket, key, f)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            if not_found(exc):
                raise MissingShard(
                    f"{url}: shard missing from the store (it is in the index)"
                ) from None
            code = disk_full_code(exc) or (errno.ENOSPC if "No space left" in str(exc) else None)
            if code is not None:
                raise DiskFull(
                    f"shard cache {self.dir}: no room for {url} ({entry.filesize / 1e6:.1f} MB, "
                    f"{free_bytes(self.dir) / 1e6:.1f} MB free); lower {CACHE_LIMIT_ENV} or "
                    f"point {CACHE_DIR_ENV} at a larger disk",
                    code,
                ) from exc
            self._failed(exc, url)
            raise
        got = file_sha256(tmp)
        if got != entry.sha256:
            tmp.unlink(missing_ok=True)
            raise CorruptShard(
                f"{url}: downloaded bytes have sha256 {got[:12]}, index says {entry.sha256[:12]}"
            )
        os.replace(tmp, local)

    def close(self) -> None:
        """Let go of the cache directory (the process's end does it too)."""
        self._hold.close()

    def _evict(self, keep: Path | None) -> None:
        """Drop least recently used files until they and the downloads in flight fit
        under the limit (called with the lock held): files no reader has pinned first,
        then pinned ones. A reader that still has an evicted shard open keeps reading
        it: the kernel frees the bytes when it closes."""
        total = sum(self._files.values())
        pinned = set().union(*self._pinned.values()) if self._pinned else set()
        order = [p for p in self._files if p not in pinned]
        order += [p for p in self._files if p in pinned]
        for path in order:
            if total + self._reserved <= self.limit:
                break
            if path == keep:
                continue
            total -= self._files.pop(path)
            self._unchecked.discard(path)
            path.unlink(missing_ok=True)


def _claim(root: Path, name: str):
    """The first of ``root/name``, ``root/name-1``, ... that no live process holds, and
    the open ``.lock`` file that holds it (an exclusive ``flock``: the kernel lets go when
    the process ends, however it ends, so a killed run leaves no stale lock). Found in
    review: two stages run by hand side by side (one host, one LOCAL_RANK) shared a
    directory, evicted each other's files and crashed with FileNotFoundError."""
    for n in itertools.count():
        d = root / (name if n == 0 else f"{name}-{n}")
        d.mkdir(parents=True, exist_ok=True)
        hold = open(d / ".lock", "a")  # noqa: SIM115 (held for the store's life)
        try:
            fcntl.flock(hold, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            hold.close()
            continue
        except OSError as exc:  # a filesystem without locks: run one process on it
            say(f"shard cache {d}: cannot lock it ({exc}); keep to one process on it")
        return d, hold


class CorruptShard(Exception):
    """A shard that cannot be read: the loader skips it, counts it and says why."""
