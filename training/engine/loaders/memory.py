"""The in-memory loader: the whole split decoded once into CPU tensors.

Same batches as the streaming loader, bit for bit (the same ``BlockOrder`` over the same
samples, and the same stand-in for a bad sample): it is the baseline the streaming path
is measured against (``benchmarks/loader_ab.py``), and a fine choice for splits that fit
in RAM many times over. Data too large for memory must stream (``loader: stream``, the
default).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from training.engine.batches import count_served
from training.engine.loaders.stream import Split, Walk
from training.errors import UserError


class InMemory(Split):
    """The split's decoded tensors, one set per bucket (a batch never mixes buckets)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        parts, valid = [], []
        lengths = self.index.lengths
        runs = self.pool.map(
            self._whole_shard, range(len(lengths)), [list(enumerate(range(n))) for n in lengths]
        )
        for run in runs:
            samples = [s for _, s in run]
            valid += [s is not None for s in samples]
            good = next((s for s in samples if s is not None), None)
            if good is not None:  # bad samples hold a placeholder; batches never use it
                parts.append(self.collate([s if s is not None else good for s in samples]))
            else:
                parts.append(None)
        self.valid = np.array(valid)
        if not self.valid.any():
            raise UserError(f"{self.source}: no sample could be read")
        groups = (self.bucketed and self.index.groups) or [0] * len(lengths)
        self.tensors: dict[int, dict[str, torch.Tensor]] = {}  # bucket -> its samples
        self.first: dict[int, int] = {}  # bucket -> its first global id
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        for g in dict.fromkeys(groups):
            mine = [i for i, x in enumerate(groups) if x == g]
            shape = next((parts[i] for i in mine if parts[i] is not None), None)
            if shape is None:  # no readable sample: its batches come from another bucket
                continue  # (Split._drawn finds it unreadable, as the stream does)
            for i in mine:  # an unreadable shard: placeholders
                if parts[i] is None:
                    parts[i] = {k: np.repeat(v[:1], lengths[i], axis=0) for k, v in shape.items()}
            self.first[g] = int(starts[mine[0]])
            self.tensors[g] = {
                k: torch.from_numpy(np.concatenate([parts[i][k] for i in mine])) for k in shape
            }
        self._group_of = np.repeat(np.asarray(groups), lengths)
        self.close()  # everything is in self.tensors; no shard stays open

    def _whole_shard(self, shard: int, items: list[tuple[int, int]]) -> list:
        """A shard's samples, its reader closed once they are read: at most one shard a
        decode thread is open at a time (was: all of them until the end, and a split of
        1,000 shards ran out of file handles, "Too many open files", and was reported
        as failing storage)."""
        try:
            return self._shard_run(shard, items)
        finally:
            with self._shard_locks[shard]:
                reader = self._readers.pop(shard, None)
            if reader is not None:
                reader.close()

    def _stand_ins(self, ids: np.ndarray, walk: Walk) -> np.ndarray:
        out = ids.copy()
        for i in np.flatnonzero(~self.valid[ids]):
            k = 1
            while not self.valid[walk(int(i), k)]:  # Unreadable: the whole bucket is bad
                k += 1
            out[i] = walk(int(i), k)
        return out

    def _rows(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        g = int(self._group_of[idx[0]])
        local = torch.from_numpy(idx - self.first[g])
        return {k: v[local] for k, v in self.tensors[g].items()}

    def _read(self, ids: np.ndarray, walk: Walk) -> dict[str, torch.Tensor]:
        return self._rows(self._stand_ins(ids, walk))

    def take(self, ids: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        return self._plain(np.asarray(ids, dtype=np.int64), self._read)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        count_served(self.global_batch)  # the loop's samples/s
        return self._drawn(step, self._read)
