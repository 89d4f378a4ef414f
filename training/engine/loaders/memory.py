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

from training.engine.loaders.stream import MAX_WALK, Split, Walk
from training.errors import UserError


class InMemory(Split):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        parts, valid = [], []
        lengths = self.index.lengths
        runs = self.pool.map(
            self._shard_run, range(len(lengths)), [list(enumerate(range(n))) for n in lengths]
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
        shape = next(p for p in parts if p is not None)
        for i, n in enumerate(self.index.lengths):  # an unreadable shard: placeholders
            if parts[i] is None:
                parts[i] = {k: np.repeat(v[:1], n, axis=0) for k, v in shape.items()}
        self.tensors = {k: torch.from_numpy(np.concatenate([p[k] for p in parts])) for k in shape}
        self.close()  # everything is in self.tensors; no shard stays open

    def _stand_ins(self, ids: np.ndarray, walk: Walk) -> torch.Tensor:
        out = ids.copy()
        for i in np.flatnonzero(~self.valid[ids]):
            k = 1
            while not self.valid[walk(int(i), k)]:
                k += 1
                if k > MAX_WALK:
                    raise UserError(f"{self.source}: sample {ids[i]} has no readable stand-in")
            out[i] = walk(int(i), k)
        return torch.from_numpy(out)

    def take(self, ids: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        ids = np.asarray(ids, dtype=np.int64)
        idx = self._stand_ins(ids, lambda i, k: (int(ids[i]) + k) % self.order.n)
        return {k: v[idx] for k, v in self.tensors.items()}

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        idx = self._stand_ins(*self.local_ids(step))
        return {k: v[idx] for k, v in self.tensors.items()}
