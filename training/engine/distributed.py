"""Device choice and data parallelism.

* Device: the GPU when there is one (``KILN_DEVICE`` overrides), with bf16 autocast
  there; the CPU otherwise. torch's CPU threads are sized once per process from the CPUs
  it may really use (affinity, cgroup quota) over the processes on the machine
  (``set_torch_threads``).
* Data parallel (``torchrun``; ``KILN_NPROC`` makes a stage relaunch itself under it):
  every rank draws the same global batch from ``(seed, step)`` and trains on its slice
  (``local``); gradients are averaged with one flattened all-reduce per step (gloo on the
  CPU, NCCL on GPUs). So N processes compute the same update as one process with the
  same global batch, up to float summation order. Rank 0 alone logs, checkpoints, saves.
"""

from __future__ import annotations

import os

import torch

from training.console import say


def device() -> torch.device:
    """Where training and sampling run: ``KILN_DEVICE`` if set (``cpu``, ``cuda``,
    ``cuda:1``), else the GPU when there is one (under torchrun: ``cuda:LOCAL_RANK``).
    An environment setting, not a params.yaml key: where a stage runs must not make DVC
    call its outputs stale."""
    name = os.environ.get("KILN_DEVICE")
    if not name:
        name = "cpu"
        if torch.cuda.is_available():
            name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if world_size() > 1 else "cuda"
    return torch.device(name)


# ---- data parallel ---------------------------------------------------------------------
def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


_threads_set = False


def set_torch_threads() -> None:
    """Size torch's intra-op thread pool once per process (``env.thread_plan``): the CPUs
    this process may use (affinity, cgroup quota) shared by the processes on this
    machine. torch's own default counts the host's cores, so in a CPU-limited container,
    or with several ranks on one machine, threads wait on each other's time slices. The
    count does not depend on load, so a resumed run uses the same count as the run it
    resumes on the same machine (thread count can change float summation order)."""
    global _threads_set
    if _threads_set:
        return
    _threads_set = True
    from training.env import thread_plan

    plan = thread_plan()
    if plan.threads is not None:
        torch.set_num_threads(plan.threads)
    if is_main():
        how = f"{plan.source}; " if plan.source else ""
        say(
            f"torch threads: {torch.get_num_threads()} ({how}{plan.cpus} CPUs available, "
            f"{plan.procs} process{'es' if plan.procs != 1 else ''})"
        )


def init_distributed() -> None:
    """Size torch's threads, then join the torchrun process group (no-op for a single
    process). Every torch stage calls this first (its phase's ``stage()``)."""
    set_torch_threads()
    if world_size() > 1 and not torch.distributed.is_initialized():
        dev = device()
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")


def local(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """This rank's contiguous slice of a global batch (all ranks draw the same one)."""
    w = world_size()
    if w == 1:
        return tensors
    n = tensors[0].shape[0]
    if n % w:
        raise ValueError(f"global batch {n} does not split evenly over {w} processes")
    per, r = n // w, rank()
    return tuple(t[r * per : (r + 1) * per] for t in tensors)


def all_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a detached copy)."""
    if world_size() == 1:
        return x.detach()
    y = x.detach().clone()
    torch.distributed.all_reduce(y)
    return y / world_size()


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sums over ranks of a few numbers (e.g. counters); every rank calls it."""
    if world_size() == 1:
        return list(values)
    # on the rank's device: NCCL (the GPU backend) reduces CUDA tensors only
    t = torch.tensor(values, dtype=torch.float64, device=device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def all_union(items: set) -> set:
    """The union over ranks of a set of picklable things (e.g. the shards each rank
    found bad: every rank reads the same blocks, so a sum would count one shard once
    per rank); every rank calls it."""
    if world_size() == 1:
        return set(items)
    parts: list = [None] * world_size()
    torch.distributed.all_gather_object(parts, sorted(items))
    return {x for part in parts for x in part}


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


class _Gather(torch.autograd.Function):
    """All-gather along dim 0 that passes gradients back. Every rank computes the same
    loss from the gathered tensor, so the true gradient of a rank's slice (the sum over
    ranks of their identical gradients) is ``world`` times its own; ``sync_gradients``
    then averages, which leaves exactly the single-process gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(world_size())]
        torch.distributed.all_gather(parts, x.contiguous())
        ctx.n = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        r = rank()
        return grad[r * ctx.n : (r + 1) * ctx.n] * world_size()


def gather(x: torch.Tensor) -> torch.Tensor:
    """The global batch of a per-rank tensor, differentiable (contrastive losses)."""
    return x if world_size() == 1 else _Gather.apply(x)


def sync_gradients(model: torch.nn.Module) -> None:
    """Average gradients over ranks with one flattened all-reduce. DistributedDataParallel
    would overlap this with the backward pass, but it hooks only ``forward()``, and the
    VAE trains through ``encode()``/``decode()``; one call per step is what it costs."""
    if world_size() == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
