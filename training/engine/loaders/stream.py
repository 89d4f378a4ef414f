"""The streaming loader: batches read from shards on demand, never a whole split in RAM.

``batch(step)`` returns this process's slice of the global batch of ``step``
(``engine.order.BlockOrder``): sample ids -> (shard, index) -> the shard's reader
(``readers``, opened from a local path or the object-store cache, ``intake.store``) ->
the phase's ``decode(sample)`` in a thread pool -> its ``collate(samples)``. While the
trainer runs step k, a background thread reads and decodes step k+1's samples (no torch
there: see ``_collated``), and the shards of the next block are downloaded ahead. Memory
holds two batches and the open shards' indexes (shards are read with ``pread``, not
mapped); the cache on disk is bounded; nothing grows with the split.

Bad data never stops a run: a shard that cannot be read (truncated, corrupt, wrong
checksum) is skipped from then on, a sample that cannot be decoded is skipped, both are
counted (``stats()``) and said once with their reason. A skipped sample's place is
taken by the next readable sample of the epoch's order after it (of the canonical order
when reading in order), a rule that does not depend on which process reads it, so the
batches stay the same for any number of processes and keep their size. A bucket none
of whose samples can be read has its batches drawn from another (``unreadable``). An
I/O error is not bad data: the read is tried again, then the stage stops
(``readers.retrying``), as it does for a shard missing from the store, a full cache
disk, or a split that is mostly unreadable.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from training.console import say
from training.engine import order as orders
from training.engine.batches import count_served
from training.engine.distributed import is_main, rank, world_size
from training.engine.loaders.readers import ShardUnreachable, open_shard, retrying
from training.engine.loaders.unreadable import Unreadable, UnreadableBuckets
from training.env import loader_threads
from training.errors import UserError
from training.intake.store import CorruptShard, Store, is_remote
from training.intake.store_errors import STORE_FAILURES

Decode = Callable[[dict], Any]  # one raw sample -> what collate takes
# decoded samples -> {name: numpy array} (torch-free: it runs on the look-ahead thread)
Collate = Callable[[list], dict[str, Any]]
# (i, k) -> the k-th stand-in for the i-th sample's id; raises Unreadable once k has
# passed every other sample of the sample's bucket
Walk = Callable[[int, int], int]


class Split:
    """Random access to a split's samples by global id (canonical order: the index's
    shards in order, each shard's samples in order), with skipping of bad data.
    ``members``: the sample members to read (``None``: all). ``with_ids``: each sample
    ``decode`` gets carries its global id as ``"__id__"`` (to look up data kept beside
    the shards, such as CLIP's token table)."""

    def __init__(
        self,
        source: str,
        decode: Decode,
        collate: Collate,
        batch_size: int = 1,
        seed: int = 0,
        block_shards: int = 1,
        store: Store | None = None,
        members: Sequence[str] | None = None,
        by_bucket: bool = True,
        with_ids: bool = False,
    ):
        self.source, self.decode, self.collate = source, decode, collate
        self.store = store or Store.shared()
        self.index = self.store.index(source)
        self.store.check_fits(self.index, block_shards, by_bucket)
        self.order = orders.make(
            self.index.lengths, batch_size, seed, block_shards,
            self.index.groups if by_bucket else None,
        )  # fmt: skip
        self.global_batch = self.order.batch_size
        self._asked = batch_size
        for note in orders.batch_notes(self.order, batch_size, source) if is_main() else ():
            say(note)
        self.members = frozenset(members) if members else None
        self.bucketed = by_bucket
        self.with_ids = with_ids
        self.pool = ThreadPoolExecutor(loader_threads(), thread_name_prefix="kiln-decode")
        self._readers: OrderedDict[int, Any] = OrderedDict()
        self._shard_locks = {i: threading.Lock() for i in range(len(self.index.shards))}
        self._read_lock = threading.Lock()
        self._max_open = self.index.blocks_in_use(by_bucket) * block_shards + 2
        self.bad_shards: dict[str, str] = {}
        self._bad_samples: set[tuple[int, int]] = set()
        # buckets none of whose samples can be read (their reads go to another)
        self.unreadable = UnreadableBuckets(self.order, self.index.buckets(), source)
        self.downloaded = 0  # bytes this split fetched from the store
        self._closers: list[Callable[[], None]] = []
        self._closed = False

    def __len__(self) -> int:
        return self.order.n

    # ---- reading ----------------------------------------------------------------------
    def _reader(self, shard: int, fresh: bool = False):
        """The shard's open reader; None for a bad shard. ``fresh``: a new one (after an
        I/O error: a stale handle is only cured by opening the file again)."""
        with self._shard_locks[shard]:
            if fresh and shard in self._readers:
                self._readers.pop(shard).close()
            reader = self._readers.get(shard)
            if reader is not None:
                self._readers.move_to_end(shard)
            else:
                name = self.index.shards[shard].url
                if name in self.bad_shards:
                    return None
                try:
                    reader = self._open(shard)
                except CorruptShard as exc:
                    self._bad_shard(name, str(exc))
                    return None
                self._readers[shard] = reader
            return reader

    def _open(self, shard: int):
        nsamples = self.index.shards[shard].nsamples

        def attempt():
            try:
                return open_shard(self.store.path(self.index, shard, self._count), nsamples)
            except FileNotFoundError:  # evicted from the cache between fetch and open
                return open_shard(self.store.path(self.index, shard, self._count), nsamples)

        return retrying(f"{self.source}: {self.index.shards[shard].url}", attempt)

    def _count(self, nbytes: int) -> None:
        self.downloaded += nbytes

    def _bad_shard(self, name: str, reason: str) -> None:
        self.bad_shards[name] = reason
        say(f"loader: skipping shard {name} of {self.source}: {reason}")
        if len(self.bad_shards) * 2 > len(self.index.shards):
            raise UserError(
                f"{self.source}: {len(self.bad_shards)} of {len(self.index.shards)} shards are "
                f"unreadable (last: {reason}); re-create the split"
            )

    def _sample(self, sample_id: int) -> Any:
        """The decoded sample, or None if it cannot be read (counted and said)."""
        shard, i = (int(v[0]) for v in self.order.shard_of(np.array([sample_id])))
        return self._decode(shard, i)

    def _get(self, shard: int, i: int) -> dict:
        reader = self._reader(shard)
        if reader is None:  # reopened after an I/O error, and found corrupt
            raise CorruptShard(f"{self.index.shards[shard].url} became unreadable")
        return reader.get(i, self.members)

    def _decode(self, shard: int, i: int) -> Any:
        """The decoded sample, or None for a bad one. An I/O error is the storage's, not
        the sample's: tried again with the shard reopened, then the stage stops."""
        if self._reader(shard) is None or (shard, i) in self._bad_samples:
            return None
        try:
            sample = retrying(
                f"{self.source}: {self.index.shards[shard].url}",
                lambda: self._get(shard, i),
                lambda: self._reader(shard, fresh=True),
            )
            if self.with_ids:
                sample["__id__"] = int(self.order.starts[shard]) + i
            return self.decode(sample)  # an OSError here is the image's (PIL's)
        except (ShardUnreachable, *STORE_FAILURES):  # the storage's: the stage stops
            raise
        except Exception as exc:  # a bad sample must not end a three-day run
            name = self.index.shards[shard].url
            if len(self._bad_samples) < 10:
                say(f"loader: skipping sample {i} of {name}: {type(exc).__name__}: {exc}")
            elif len(self._bad_samples) == 10:
                say("loader: more bad samples; counting them without naming each")
            self._bad_samples.add((shard, i))
            return None

    def _shard_run(self, shard: int, items: list[tuple[int, int]]) -> list[tuple[int, Any]]:
        """Decode ``(slot, index)`` items of one shard: one task per shard, not per
        sample, keeps the thread pool's own overhead off the step."""
        return [(slot, self._decode(shard, i)) for slot, i in items]

    @property
    def skipped_samples(self) -> int:
        """Distinct samples skipped so far (each is tried once)."""
        return len(self._bad_samples)

    def _collated(self, ids: np.ndarray, walk: Walk) -> dict[str, Any]:
        """The collated samples with these global ids, a bad one replaced by its first
        readable stand-in along ``walk``. Torch-free (decode and collate make numpy
        arrays): it runs on the look-ahead thread, where a torch op would start a second
        OpenMP thread team that spins against the training step's own (that made the
        tiny U-Net 1.8x slower). The caller's thread wraps the arrays (``_tensors``)."""
        with self._read_lock:
            shards, inner = self.order.shard_of(np.asarray(ids, dtype=np.int64))
            groups: dict[int, list[tuple[int, int]]] = {}
            for slot, (shard, i) in enumerate(zip(shards.tolist(), inner.tolist(), strict=True)):
                groups.setdefault(shard, []).append((slot, i))
            samples: list[Any] = [None] * len(shards)
            for part in self.pool.map(self._shard_run, groups, groups.values()):
                for slot, sample in part:
                    samples[slot] = sample
            for i, s in enumerate(samples):
                k = 0
                while s is None:
                    k += 1
                    s = self._sample(walk(i, k))  # Unreadable: the whole bucket is bad
                samples[i] = s
            self._close_unused()
            return self.collate(samples)

    def _close_unused(self) -> None:
        while len(self._readers) > self._max_open:
            self._readers.popitem(last=False)[1].close()

    def canonical_walk(self, ids: np.ndarray) -> Walk:
        """Stand-ins for a plain read: the next readable sample in canonical order,
        within the sample's bucket."""

        def walk(i: int, k: int) -> int:
            lo, hi = self.order.group_range(int(ids[i]))
            if k >= hi - lo:
                raise Unreadable(self.order.group_of(int(ids[i])))
            return lo + (int(ids[i]) - lo + k) % (hi - lo)

        return walk

    def _plain(self, ids: np.ndarray, read: Callable[[np.ndarray, Walk], Any]) -> Any:
        """``read(ids, walk)`` for a plain read; again with a bucket found unreadable
        moved to its substitute."""
        while True:
            moved = self.unreadable.moved(ids, self.bad_shards)
            try:
                return read(moved, self.canonical_walk(moved))
            except Unreadable as exc:
                self.unreadable.add(exc.bucket, self.bad_shards)

    def _drawn(self, step: int, read: Callable[[np.ndarray, Walk], Any]) -> Any:
        """``read(ids, walk)`` of this process's slice of ``step``'s batch; again from
        the substitute bucket when the step's own is found unreadable (every rank finds
        it so: each of their slices is all bad)."""
        while True:
            bucket = self.unreadable.bucket(step, self.bad_shards)
            self._prepare(step, bucket)
            try:
                return read(*self.local_ids(step, bucket))
            except Unreadable as exc:
                self.unreadable.add(exc.bucket, self.bad_shards)

    def _prepare(self, step: int, bucket: int) -> None:
        """Before reading ``step``'s batch from ``bucket`` (the stream downloads ahead)."""

    def take(self, ids: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """The collated samples with these global ids (a bad one replaced by the next
        readable sample in canonical order). In a split of buckets, ids of one bucket."""
        return _tensors(self._plain(np.asarray(ids, dtype=np.int64), self._collated))

    def by_bucket(self, ids: np.ndarray) -> list[np.ndarray]:
        """``ids`` grouped by bucket (first-seen order of buckets, ids in their order)."""
        ids = np.asarray(ids, dtype=np.int64)
        firsts = np.array([self.order.group_range(int(i))[0] for i in ids])
        return [ids[firsts == f] for f in dict.fromkeys(firsts.tolist())]

    def picked(self, limit: int) -> np.ndarray:
        """The ids a scan of ``limit`` reads: spread evenly over the split (``order.spread``)."""
        return orders.spread(len(self), limit)

    def ranges(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        """The ids of every sample in canonical order, or of ``limit`` of them spread
        over it (``picked``), in batches that never cross from one bucket to the next."""
        ids = None if limit is None or limit >= len(self) else self.picked(limit)
        return orders.runs(self.order, batch_size, ids)

    def scan(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Every sample in canonical order, or ``limit`` of them spread over the split
        (each bucket in proportion: ``picked``), in batches of one bucket each: for
        validation sets and passes over the captions."""
        for ids in self.ranges(batch_size, limit):
            yield self.take(ids)

    # ---- this process's batch ---------------------------------------------------------
    def local_ids(self, step: int, bucket: int | None = None) -> tuple[np.ndarray, Walk]:
        """This process's slice of the step's global batch (drawn from ``bucket``, if
        given), and its stand-in walk: the epoch's order onwards from each sample's own
        position (the same on every rank; ``order.stand_in``)."""
        ids, w = self.order.step_ids(step, bucket), world_size()
        if len(ids) % w:  # a batch cut to a small split (the preflight saw batch_size)
            where = " in its largest aspect-ratio bucket" if self.index.groups else ""
            raise UserError(
                f"{self.source}: batch_size {self._asked} is cut to the {len(ids)} samples it "
                f"holds{where}, which do not split over {w} processes (KILN_NPROC); lower "
                f"batch_size to a multiple of {w} of at most that, or use fewer processes"
            )
        per = len(ids) // w
        first = rank() * per
        b = self.order.bucket_of(step) if bucket is None else bucket
        lo, hi = self.order.bucket_range(b)

        def walk(i: int, k: int) -> int:
            if k >= hi - lo:
                raise Unreadable(b)
            return self.order.stand_in(step, first + i, k, bucket)

        return ids[first : first + per], walk

    def stats(self) -> dict[str, Any]:
        """What the loader saw (every rank must call it): the distinct shards, samples
        and buckets any process skipped, the same for any number of processes (each
        reads the same blocks, so each finds the same bad shard), and the megabytes all
        of them downloaded."""
        from training.engine.distributed import all_sum, all_union

        return {
            "loader_skipped_shards": len(all_union(set(self.bad_shards))),
            "loader_skipped_samples": len(all_union(self._bad_samples)),
            "loader_downloaded_mb": all_sum([self.downloaded / 1e6])[0],
            "loader_unreadable_buckets": len(all_union(self.unreadable.found)),
            # not metrics (strings stay in data/metrics): what was read, and its content
            "loader_source": self.source,
            "loader_index_fingerprint": self.index.fingerprint(),
        }

    def on_close(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` when the split is closed (now, if it already is: the in-memory
        loader closes itself once it has read everything)."""
        if self._closed:
            fn()
        else:
            self._closers.append(fn)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        self._closed = True
        while self._closers:
            self._closers.pop()()


class Streaming(Split):
    """``batch(step)``: this process's slice of the step's global batch, read on demand,
    the next step's samples and the next block's downloads prepared in the background."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix="kiln-prefetch")
        self._fetch = ThreadPoolExecutor(2, thread_name_prefix="kiln-download")
        self._next: tuple[int, Future] | None = None
        self._fetched_blocks: set[tuple[int, int]] = set()
        self._live: dict[int, list[int]] = {}  # bucket -> shards of its current and next block

    def _prepare(self, step: int, bucket: int) -> None:
        if is_remote(self.index.base):
            blocks = self.order.blocks_at(step, bucket)
            # every bucket's current and next block stays in the cache (Store.pin)
            self._live[bucket] = [s for _, block in blocks for s in block.tolist()]
            self.store.pin(self, self.index, {s for b in self._live.values() for s in b})
            for key, block in blocks:
                if key not in self._fetched_blocks:
                    self._fetched_blocks.add(key)
                    for s in block.tolist():
                        self._fetch.submit(self.store.path, self.index, s, self._count)

    def _build(self, step: int) -> dict[str, Any]:
        return self._drawn(step, self._collated)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        ahead, self._next = self._next, None
        arrays = ahead[1].result() if ahead and ahead[0] == step else self._build(step)
        self._next = (step + 1, self._ahead.submit(self._build, step + 1))
        count_served(self.global_batch)  # the loop's samples/s
        return _tensors(arrays)

    def close(self) -> None:
        if self._next:
            self._next[1].cancel()
            with contextlib.suppress(Exception):  # an unused look-ahead's error is moot
                self._next[1].result()
        self._ahead.shutdown(wait=True)
        self._fetch.shutdown(wait=True, cancel_futures=True)
        self.store.unpin(self)
        super().close()


def _tensors(arrays: Any) -> Any:
    """numpy arrays as tensors sharing their memory (no copy, no torch threads)."""
    if not isinstance(arrays, dict):
        return arrays
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in arrays.items()}
