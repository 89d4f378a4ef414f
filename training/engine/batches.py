"""What a step draws: its batch indices, its noise, its learning rate.

Data stays on the CPU and batches move per step, so the ``(seed, step)`` randomness is
drawn on the CPU and is identical on every device and for any number of processes.
"""

from __future__ import annotations

import contextlib
import math

import torch

# A step's extra metrics: tensors are fine (and better on a GPU: they are read only at
# log steps, so the step never waits for them).
StepMetrics = dict[str, float | torch.Tensor]


# Samples of the global batches the training loaders have handed out in this process
# (``loaders``' ``batch(step)``). The loop's samples/s counts these: a loader caps its
# batch at the split's size or its largest aspect-ratio bucket's, and the phases give
# the loop a step function, not the loader (found in review: batch_size was counted).
_served = [0]


def count_served(n: int) -> None:
    _served[0] += n


def served() -> int:
    return _served[0]


def to_device(dev: torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Move a step's host tensors to ``dev`` without stalling the GPU queue. A copy from
    ordinary (pageable) host memory waits for every kernel already queued; from pinned
    memory it is asynchronous, so the CPU can prepare step k+1 while the GPU runs k."""
    if dev.type != "cuda":
        return tuple(t.to(dev) for t in tensors)
    return tuple(t.pin_memory().to(dev, non_blocking=True) for t in tensors)


def autocast(dev: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (bf16 needs no loss scaling); full precision on the CPU,
    where bf16 made the U-Net step 2.1x slower (benchmarks/RESULTS.md)."""
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A generator whose state depends only on (seed, step, stream)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + stream) % 2**63)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the global batch at ``step`` over ``n`` samples held in memory: the
    loaders' order (``engine.order.BlockOrder``) for a one-shard split, i.e. a seeded
    permutation per epoch, last partial batch dropped. For benchmarks and tests that
    hold synthetic data; the training stages use the loaders."""
    from training.engine.order import BlockOrder

    return torch.from_numpy(BlockOrder([n], batch_size, seed, 1).step_ids(step))


def cosine_lr(step: int, base_lr: float, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up then cosine decay to ``floor * base_lr`` (computed, not stored).
    The warm-up takes at most half the run: a run shorter than its ``warmup_steps`` (a
    short fine-tune, ``finetune_steps`` 60 under the default 100) otherwise ended at
    its highest rate, never decayed."""
    warmup = min(warmup, total // 2)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
