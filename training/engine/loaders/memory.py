"""The in-memory loader: the whole split as CPU tensors (what tiny and small need).

Batch ``k`` is a pure function of ``(seed, k)`` (``batches.batch_indices``: a seeded
permutation per epoch, last partial batch dropped), so a resumed run needs no loader
state and every data-parallel rank draws the same global batch."""

from __future__ import annotations

import torch

from training.engine.batches import batch_indices


class InMemory:
    def __init__(self, tensors: dict[str, torch.Tensor], batch_size: int, seed: int):
        sizes = {k: len(v) for k, v in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"in-memory loader: tensors of different lengths {sizes}")
        self.tensors, self.batch_size, self.seed = tensors, batch_size, seed
        self.n = next(iter(sizes.values()))

    def __len__(self) -> int:
        return self.n

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The global batch of ``step`` (each rank then takes its slice)."""
        idx = batch_indices(self.n, self.batch_size, step, self.seed)
        return {k: v[idx] for k, v in self.tensors.items()}
