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
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

_SHARD_ORDER, _IN_BLOCK = 0, 1


class BlockOrder:
    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, block_shards: int):
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
        return np.random.default_rng([self.seed, epoch, purpose, block])

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

    def step_ids(self, step: int) -> np.ndarray:
        """Global sample ids of the global batch of ``step``."""
        epoch, j = divmod(step, self.per_epoch)
        return self.ids(epoch, j * self.batch_size, (j + 1) * self.batch_size)

    def shard_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard number, index inside the shard) of global sample ids."""
        shard = np.searchsorted(self.starts, ids, side="right") - 1
        return shard, ids - self.starts[shard]

    def blocks_at(self, step: int) -> list[tuple[tuple[int, int], np.ndarray]]:
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
