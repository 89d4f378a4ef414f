"""Which samples a step draws: a seeded block shuffle, a pure function of ``(seed, step)``.

A full random permutation of a split is what an in-memory trainer wants, but streamed
from object storage it touches every shard every few batches, and no bounded cache
survives that. So each epoch (1) shuffles the shard order, (2) cuts it into blocks of
``block_shards`` shards and (3) permutes the samples of each block; the epoch is the
blocks one after another. A cache that holds two blocks (the one being read and the
next, prefetched) then serves every batch. With one block (a split of at most
``block_shards`` shards) this is a full permutation of the split.

Global batch ``j`` of an epoch is positions ``[j*B, (j+1)*B)`` of its order (the last
partial batch is dropped, so every batch has ``B`` samples). Nothing here depends on the
number of processes or loader threads: rank ``r`` of ``N`` reads positions
``[j*B + r*B/N, j*B + (r+1)*B/N)`` of the same order, so N processes train on the same
global batches as one, and resuming at step ``k`` needs no loader state at all.

The randomness is numpy's ``SeedSequence`` of ``(seed, epoch, purpose, block)``: streams
for different epochs and blocks never collide.

A split in aspect-ratio buckets (``intake.buckets``; each shard holds one bucket) gets a
``BucketOrder``: one block order per bucket, each bucket's full batches, and the epoch's
batches in a seeded order, so every batch comes from one bucket. A bad sample's
stand-in (``stand_in``) comes from the same bucket.

A bucket none of whose samples can be read (its one shard truncated, say) cannot fill
its batches, and a batch must be one shape, so its steps are drawn from another bucket
instead: ``substitute`` names the largest readable one, and ``step_ids``, ``stand_in``
and ``blocks_at`` take that bucket as ``bucket``. Which buckets are unreadable is a
property of the data, found by the loader when it reads them (``loaders.stream``), so
the batches stay a function of ``(seed, step)`` and the data: a resumed run, or
another rank, that finds the same bucket unreadable draws the same substitute batch.
A plain split is one bucket, number 0.
"""

from __future__ import annotations

from collections.abc import Container, Iterator, Sequence
from functools import lru_cache

import numpy as np

_SHARD_ORDER, _IN_BLOCK, _BATCH_ORDER = 0, 1, 2


class BlockOrder:
    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int | Sequence[int],
        block_shards: int,
    ):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) == 0 or int(self.lengths.sum()) == 0:
            raise ValueError("a split with no samples has no batch order")
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.n = int(self.lengths.sum())
        self.batch_size = min(batch_size, self.n)
        self.per_epoch = self.n // self.batch_size
        self.seed, self.block_shards = seed, max(1, block_shards)
        self._layout = lru_cache(maxsize=2)(self._epoch_layout)
        self._block = lru_cache(maxsize=4)(self._block_ids)

    def _rng(self, epoch: int, purpose: int, block: int = 0) -> np.random.Generator:
        seed = [self.seed] if isinstance(self.seed, int) else list(self.seed)
        return np.random.default_rng([*seed, epoch, purpose, block])

    def _epoch_layout(self, epoch: int) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
        """The epoch's blocks (shard numbers, each block sorted) and their end positions."""
        shards = np.arange(len(self.lengths))
        if len(shards) > self.block_shards:
            shards = self._rng(epoch, _SHARD_ORDER).permutation(shards)
        blocks = tuple(
            np.sort(shards[i : i + self.block_shards])
            for i in range(0, len(shards), self.block_shards)
        )
        ends = np.cumsum([int(self.lengths[b].sum()) for b in blocks])
        return blocks, ends

    def _block_ids(self, epoch: int, block: int) -> np.ndarray:
        """Global sample ids of one block, in the epoch's order."""
        shards = self._layout(epoch)[0][block]
        ids = np.concatenate(
            [np.arange(self.starts[s], self.starts[s] + self.lengths[s]) for s in shards]
        )
        return ids[self._rng(epoch, _IN_BLOCK, block).permutation(len(ids))]

    def ids(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Global sample ids at positions ``[start, stop)`` of an epoch's order."""
        _, ends = self._layout(epoch)
        out, pos = [], start
        while pos < stop:
            b = int(np.searchsorted(ends, pos, side="right"))
            if b >= len(ends):
                raise IndexError(f"position {pos} is past the epoch's {self.n} samples")
            lo = int(ends[b - 1]) if b else 0
            take = min(stop, int(ends[b])) - pos
            out.append(self._block(epoch, b)[pos - lo : pos - lo + take])
            pos += take
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def step_ids(self, step: int, bucket: int | None = None) -> np.ndarray:
        """Global sample ids of the global batch of ``step`` (one bucket: ``bucket`` is
        there for ``BucketOrder``'s signature)."""
        epoch, j = divmod(step, self.per_epoch)
        return self.ids(epoch, j * self.batch_size, (j + 1) * self.batch_size)

    def bucket_of(self, step: int) -> int:
        return 0

    def bucket_range(self, bucket: int) -> tuple[int, int]:
        return 0, self.n

    def substitute(self, unreadable: Container[int]) -> int | None:
        """The bucket that draws an unreadable bucket's batches: none, in one bucket."""
        return None if 0 in unreadable else 0

    def shard_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard number, index inside the shard) of global sample ids."""
        shard = np.searchsorted(self.starts, ids, side="right") - 1
        return shard, ids - self.starts[shard]

    def blocks_at(
        self, step: int, bucket: int | None = None
    ) -> list[tuple[tuple[int, int], np.ndarray]]:
        """``((epoch, block), shard numbers)`` of the block that holds ``step``'s first
        sample and of the block after it (the next epoch's first at the end of an
        epoch): what to prefetch."""
        epoch, j = divmod(step, self.per_epoch)
        blocks, ends = self._layout(epoch)
        b = min(int(np.searchsorted(ends, j * self.batch_size, side="right")), len(blocks) - 1)
        if b + 1 < len(blocks):
            return [((epoch, b), blocks[b]), ((epoch, b + 1), blocks[b + 1])]
        return [((epoch, b), blocks[b]), ((epoch + 1, 0), self._layout(epoch + 1)[0][0])]

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, position in the epoch's order) of ``step``'s first sample."""
        epoch, j = divmod(step, self.per_epoch)
        return epoch, j * self.batch_size

    @property
    def epoch_len(self) -> int:
        """Positions in an epoch's order (``ids``): every sample."""
        return self.n

    def stand_in(self, step: int, i: int, k: int, bucket: int | None = None) -> int:
        """Global id of the ``k``-th stand-in for sample ``i`` of ``step``'s global batch:
        the epoch's order onwards from the sample's own position (``k < n``: each
        other sample once)."""
        epoch, start = self.position(step)
        pos = (start + i + k) % self.n
        return int(self.ids(epoch, pos, pos + 1)[0])

    def group_of(self, sample_id: int) -> int:
        return 0

    def group_range(self, sample_id: int) -> tuple[int, int]:
        """The canonical id range a sample's stand-ins in a plain read come from."""
        return 0, self.n


class BucketOrder:
    """Batches that each come from one bucket. ``groups[s]`` is shard ``s``'s bucket
    number; the shards of a bucket must be contiguous in the split's order (validate
    names them so). Each bucket has its own ``BlockOrder`` (seeded with the run's seed
    and the bucket number) and contributes its full batches to each epoch; a bucket
    smaller than a batch contributes none (``untrained`` counts them, the stages say
    so). The epoch's batches are a seeded permutation of all buckets' batches. A
    bucket found unreadable keeps its places in that permutation; the loader draws
    them from ``substitute``'s bucket (``step_ids(step, bucket)``)."""

    def __init__(
        self,
        lengths: Sequence[int],
        groups: Sequence[int],
        batch_size: int,
        seed: int,
        block_shards: int,
    ):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.n = int(self.lengths.sum())
        self.seed = seed
        groups = np.asarray(groups)
        self.shards = [np.flatnonzero(groups == g) for g in dict.fromkeys(groups.tolist())]
        for s in self.shards:
            if np.any(np.diff(s) != 1):
                raise ValueError("a bucket's shards must be contiguous in the split's order")
        self.batch_size = min(batch_size, max(int(self.lengths[s].sum()) for s in self.shards))
        self.orders = [
            BlockOrder(self.lengths[s], self.batch_size, (seed, b), block_shards)
            if self.lengths[s].sum() >= self.batch_size
            else None
            for b, s in enumerate(self.shards)
        ]
        self.untrained = sum(int(self.lengths[s].sum()) for s, o in self._pairs() if o is None)
        # the epoch's batches, unpermuted: (bucket, batch number in the bucket's epoch)
        per = [o.per_epoch if o else 0 for o in self.orders]
        self._batches = np.stack(
            [np.repeat(np.arange(len(per)), per), np.concatenate([np.arange(k) for k in per])],
            axis=1,
        )
        self.per_epoch = len(self._batches)
        self._perm = lru_cache(maxsize=2)(self._epoch_batches)

    @property
    def epoch_len(self) -> int:
        """Positions in an epoch's order (``ids``): its full batches."""
        return self.per_epoch * self.batch_size

    def _pairs(self):
        return zip(self.shards, self.orders, strict=True)

    def _epoch_batches(self, epoch: int) -> np.ndarray:
        """The epoch's (bucket, batch number) pairs: the buckets' batches interleaved at
        random, each bucket's in its own order (its samples are already shuffled by its
        ``BlockOrder``). Was: every pair permuted, so a bucket's batches jumped between
        its blocks, and a streamed split of 3 buckets fetched 2.0x its shards an epoch
        through the cache it is budgeted, 1.9x through twice that (RESULTS.md,
        "Bucketed streaming")."""
        rng = np.random.default_rng([self.seed, epoch, _BATCH_ORDER])
        buckets = self._batches[rng.permutation(self.per_epoch), 0]
        out = np.empty_like(self._batches)
        out[:, 0] = buckets
        for b in np.unique(buckets):
            mine = buckets == b
            out[mine, 1] = np.arange(int(mine.sum()))
        return out

    def _batch(self, step: int, bucket: int | None = None) -> tuple[int, int, int]:
        """(epoch, bucket, batch number in the bucket's epoch) of a step; drawn from
        ``bucket`` instead of its own: that bucket's batch of the same number (modulo
        its batches an epoch), in the same epoch."""
        epoch, j = divmod(step, self.per_epoch)
        b, jb = (int(v) for v in self._perm(epoch)[j])
        if bucket is not None and bucket != b:
            b, jb = bucket, jb % self.orders[bucket].per_epoch
        return epoch, b, jb

    def bucket_of(self, step: int) -> int:
        """The bucket whose batch ``step`` draws (when it can be read)."""
        return self._batch(step)[1]

    def bucket_range(self, bucket: int) -> tuple[int, int]:
        """The bucket's canonical ids (its shards are contiguous)."""
        s = self.shards[bucket]
        return int(self.starts[s[0]]), int(self.starts[s[-1]] + self.lengths[s[-1]])

    def substitute(self, unreadable: Container[int]) -> int | None:
        """The bucket that draws the batches of buckets none of whose samples can be
        read: the largest of the others that has batches (its repeats are spread over
        the most samples), or None when none is left."""
        sizes = [
            (-int(self.lengths[s].sum()), b)
            for b, (s, o) in enumerate(self._pairs())
            if o is not None and b not in unreadable
        ]
        return min(sizes)[1] if sizes else None

    def _global(self, bucket: int, local: np.ndarray) -> np.ndarray:
        shards = self.shards[bucket]
        return local + (self.starts[shards[0]])  # contiguous shards: one offset

    def step_ids(self, step: int, bucket: int | None = None) -> np.ndarray:
        """Global ids of ``step``'s batch (from ``bucket``: see ``_batch``)."""
        epoch, b, jb = self._batch(step, bucket)
        o = self.orders[b]
        return self._global(b, o.ids(epoch, jb * o.batch_size, (jb + 1) * o.batch_size))

    def stand_in(self, step: int, i: int, k: int, bucket: int | None = None) -> int:
        """The ``k``-th stand-in for sample ``i``: the bucket's epoch order onwards from
        its position (``k`` below the bucket's size: each other sample once)."""
        epoch, b, jb = self._batch(step, bucket)
        o = self.orders[b]
        pos = (jb * o.batch_size + i + k) % o.n
        return int(self._global(b, o.ids(epoch, pos, pos + 1))[0])

    def ids(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Global ids at positions ``[start, stop)`` of the epoch's batches laid end to
        end (positions past the last full batch are not part of an epoch)."""
        B = self.batch_size
        out = [self.step_ids(epoch * self.per_epoch + j) for j in range(start // B, -(-stop // B))]
        if not out:
            return np.zeros(0, dtype=np.int64)
        flat = np.concatenate(out)
        return flat[start - (start // B) * B : stop - (start // B) * B]

    def shard_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shard = np.searchsorted(self.starts, ids, side="right") - 1
        return shard, ids - self.starts[shard]

    def group_of(self, sample_id: int) -> int:
        """The bucket of a sample."""
        shard = int(np.searchsorted(self.starts, sample_id, side="right") - 1)
        for b, s in enumerate(self.shards):
            if s[0] <= shard <= s[-1]:
                return b
        raise IndexError(sample_id)

    def group_range(self, sample_id: int) -> tuple[int, int]:
        return self.bucket_range(self.group_of(sample_id))

    def blocks_at(
        self, step: int, bucket: int | None = None
    ) -> list[tuple[tuple[int, ...], np.ndarray]]:
        """The step's bucket's current and next block (global shard numbers)."""
        epoch, b, jb = self._batch(step, bucket)
        o = self.orders[b]
        return [
            ((b, *key), self.shards[b][block])
            for key, block in o.blocks_at(epoch * o.per_epoch + jb)
        ]


def batch_notes(order: BlockOrder | BucketOrder, batch_size: int, source: str) -> list[str]:
    """What a loader says, once, about a split too small for its batches: a global
    batch cut to the split's (or its largest bucket's) size, which the loop's samples/s
    counts (``batches.served``), and buckets smaller than a batch, never drawn."""
    notes, b = [], order.batch_size
    if b < batch_size:
        held = "its largest aspect-ratio bucket" if isinstance(order, BucketOrder) else "it"
        notes.append(
            f"loader: batch_size {batch_size} is more than {source} holds ({held}: {b} "
            f"samples); batches of {b}"
        )
    if getattr(order, "untrained", 0):
        notes.append(
            f"loader: warning: {order.untrained} samples of {source} are in aspect-ratio "
            f"buckets smaller than a batch of {b} and are never drawn; a smaller "
            "batch_size or fewer buckets (validate.max_aspect_ratio) keeps them"
        )
    return notes


def spread(n: int, limit: int) -> np.ndarray:
    """``limit`` of ``n`` canonical ids spread evenly (the centres of ``limit`` equal
    slices), ascending: what a scan of fewer than all samples reads (validation, the
    evaluation's real images). The canonical order is bucket by bucket, the square one
    first, so its first N were all square in a bucketed split (found in review: val
    PSNR, recall, held-out loss and FD measured square pictures only). The spread takes
    each bucket and shard in proportion, the same N always the same samples."""
    if limit <= 0:
        return np.zeros(0, dtype=np.int64)
    return (np.arange(limit, dtype=np.int64) * 2 + 1) * n // (2 * limit)


def runs(
    order: BlockOrder | BucketOrder, batch_size: int, ids: np.ndarray | None = None
) -> Iterator[np.ndarray]:
    """Ascending ``ids`` (by default every canonical id, made as they go) in batches of
    at most ``batch_size`` that never cross from one bucket to the next."""
    if ids is None:
        lo = 0
        while lo < order.n:
            end = min(order.group_range(lo)[1], lo + batch_size)
            yield np.arange(lo, end)
            lo = end
        return
    lo = 0
    while lo < len(ids):
        bucket_end = order.group_range(int(ids[lo]))[1]
        end = min(int(np.searchsorted(ids, bucket_end)), lo + batch_size)
        yield ids[lo:end]
        lo = end


def make(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    block_shards: int,
    groups: Sequence[int] | None = None,
) -> BlockOrder | BucketOrder:
    """The split's order: a ``BlockOrder``, or a ``BucketOrder`` when its shards are in
    more than one bucket (``groups``: each shard's bucket)."""
    if groups is None or len(set(groups)) <= 1:
        return BlockOrder(lengths, batch_size, seed, block_shards)
    return BucketOrder(lengths, groups, batch_size, seed, block_shards)
