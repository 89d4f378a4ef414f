"""Training data loaders: where a training phase's batches come from.

A loader is made as ``make(name, tensors, batch_size, seed)`` and gives ``len(loader)``
and ``loader.batch(step) -> {name: tensor}``, the *global* batch of ``step``: the same on
every rank (the phase takes its slice with ``distributed.local``) and a function of
``(seed, step)`` alone, so resuming at step k needs no loader state. Each training
section of params.yaml picks one with ``loader``.

Adding a loader: one module here plus one entry in ``LOADERS`` (and its name in the
``Loader`` literal of ``training/config.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from training.engine.loaders.memory import InMemory

LOADERS: dict[str, Callable] = {
    "memory": InMemory,
}


def make(name: str, tensors: dict[str, torch.Tensor], batch_size: int, seed: int):
    return LOADERS[name](tensors, batch_size, seed)
