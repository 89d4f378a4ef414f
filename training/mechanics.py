"""Training mechanics shared by the VAE, CLIP and U-Net phases — written once.

* ``Trainer.fit`` is the loop: LR schedule, NaN/Inf guard, gradient clipping, EMA,
  progress bar with loss and samples/s, per-step metrics, checkpoints, resume.
* Randomness is a pure function of ``(seed, step)`` (``step_generator``), and batch
  order a pure function of ``(seed, epoch)`` (``batch_indices``), so resuming at step k
  needs only the weights and optimizer state: no RNG state, no data-loader position,
  and a resumed run is bitwise identical to an uninterrupted one.
* Device: the GPU when there is one (``KILN_DEVICE`` overrides), with bf16 autocast
  there; the CPU otherwise. Data stays on the CPU and batches move per step, so the
  ``(seed, step)`` randomness is drawn on the CPU and identical on every device.
  torch's CPU threads are sized once per process from the CPUs it may really use
  (affinity, cgroup quota) over the processes on the machine (``set_torch_threads``).
* Data parallel (``torchrun``; ``KILN_NPROC`` makes a stage relaunch itself under it):
  every rank draws the same global batch from ``(seed, step)`` and trains on its slice
  (``local``); gradients are averaged with one flattened all-reduce per step (gloo on the
  CPU, NCCL on GPUs). So N processes compute the same update as one process with the
  same global batch, up to float summation order. Rank 0 alone logs, checkpoints, saves.
* Checkpoints are safetensors + JSON, written atomically (temp dir, fsync, rename, then
  a ``COMPLETE`` marker); the last two are kept; a corrupt newest one falls back to the
  previous with a warning; a checkpoint made with a different config or data
  (``fingerprint``) is never resumed. A full disk is a one-line ``DiskFull`` (the
  checkpoint, the bytes it needs, the bytes free) that leaves no partial directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file


class TrainingDiverged(RuntimeError):
    """Loss became NaN/Inf: the stage stops and registers nothing."""


class DiskFull(OSError):
    """A write found no room (ENOSPC/EDQUOT). An ``OSError`` with a one-line message, so
    the CLI's handler prints it as one ``kiln: error:`` line and the flow does not retry
    it (a retry would fill the same disk). safetensors' own ``SafetensorError`` is a bare
    ``Exception``: it would escape that handler as a traceback."""

    def __init__(self, message: str, code: int = errno.ENOSPC):
        super().__init__(message)  # one argument: str() is the message, no "[Errno 28]"
        self.errno = code


class MetricLogger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_image(self, path: str | Path, artifact_dir: str = "images") -> None: ...


class NullLogger:
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_image(self, path: str | Path, artifact_dir: str = "images") -> None:
        pass


def say(msg: str) -> None:
    print(f"[kiln] {msg}", file=sys.stderr, flush=True)


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
    process). Every stage process calls this first (``cli.run_stage``)."""
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


# A step's extra metrics: tensors are fine (and better on a GPU: they are read only at
# log steps, so the step never waits for them).
StepMetrics = dict[str, float | torch.Tensor]


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


def fingerprint(*parts: Any) -> str:
    """Stable hash of JSON-able parts (config dicts, data hashes)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A generator whose state depends only on (seed, step, stream)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + stream) % 2**63)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the batch at ``step``: epochs are seeded permutations, last partial
    batch dropped (so every batch has the same size)."""
    if n < batch_size:
        batch_size = n
    per_epoch = n // batch_size
    epoch, j = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=step_generator(seed, epoch, stream=1))
    return perm[j * batch_size : (j + 1) * batch_size]


def cosine_lr(step: int, base_lr: float, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up then cosine decay to ``floor * base_lr`` (computed, not stored)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def write_json(path: str | Path, obj: Any) -> None:
    """Atomic JSON write (temp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


# ---- EMA ------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of parameters, with the usual warm-up on the decay
    (``min(decay, (1 + n) / (10 + n))``) so early averages are not dominated by init."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        live = model.state_dict()
        floats = [k for k, v in live.items() if v.dtype.is_floating_point]
        shadows = [self.shadow[k] for k in floats]
        # one fused op over all tensors instead of a Python loop over hundreds
        if all(live[k].dtype == torch.float32 for k in floats):
            torch._foreach_lerp_(shadows, [live[k] for k in floats], 1 - d)
        else:
            for sh, k in zip(shadows, floats, strict=True):
                sh.lerp_(live[k].float(), 1 - d)
        for k, v in live.items():
            if not v.dtype.is_floating_point:
                self.shadow[k].copy_(v)

    def copy_to(self, model: torch.nn.Module) -> None:
        current = model.state_dict()
        model.load_state_dict({k: v.to(current[k].dtype) for k, v in self.shadow.items()})


# ---- checkpoints ---------------------------------------------------------------------
def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (what ``disk_usage`` can ask about)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mount_point(path: Path) -> Path:
    path = _existing(path)
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged writer may still use on ``path``'s filesystem."""
    return shutil.disk_usage(_existing(Path(path))).free


def _disk_full_code(exc: BaseException) -> int | None:
    """ENOSPC/EDQUOT if ``exc`` means "no room", else None. safetensors reports the OS
    error only in its message ("... No space left on device (os error 28)")."""
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in (errno.ENOSPC, errno.EDQUOT) else None
    text = str(exc)
    if "No space left on device" in text or "os error 28" in text:
        return errno.ENOSPC
    if "Disk quota exceeded" in text or "os error 122" in text:
        return errno.EDQUOT
    return None


def _disk_full(what: str, path: Path, needed: int | None, hint: str, code: int) -> DiskFull:
    need = f"needs {_mb(needed)}, " if needed is not None else "no space left: "
    return DiskFull(
        f"{what} {path}: {need}{_mb(free_bytes(path))} free on {_mount_point(path)}; {hint}",
        code,
    )


@contextlib.contextmanager
def disk_full_errors(what: str, path: str | Path, needed: int | None = None) -> Iterator[None]:
    """Turn a full disk inside the block (an ``OSError`` or safetensors' bare
    ``SafetensorError``) into ``DiskFull`` naming ``what path``, the bytes it needs if
    known and the bytes free. For writes outside the checkpointer, e.g. a phase's final
    ``save_pretrained``. Other errors pass through unchanged."""
    try:
        yield
    except Exception as exc:
        code = _disk_full_code(exc)
        if code is None or isinstance(exc, DiskFull):  # not a full disk, or said already
            raise
        path = Path(path)
        hint = f"free space on {_mount_point(path)} and run the stage again"
        raise _disk_full(what, path, needed, hint, code) from exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, k = name.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class Checkpointer:
    def __init__(self, directory: str | Path, fingerprint: str, keep: int = 2):
        self.dir = Path(directory)
        self.fp = fingerprint
        self.keep = keep

    def _complete(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("step-*") if (p / "COMPLETE").is_file())

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        ema: EMA | None,
        extra: dict | None = None,
    ) -> Path:
        """Write ``step-NNNNNNNN`` atomically and prune to the last ``keep``.

        A full disk raises ``DiskFull`` (one line: the checkpoint, the bytes it needs,
        the bytes free) and leaves no partial directory; the older checkpoints stay
        intact, so a re-run after making room resumes from the newest of them. The free
        space is checked first (the tensors' bytes are known), so usually nothing is
        written at all; a disk that fills during the write is caught and cleaned up too.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"step-{step:08d}"
        tmp = self.dir / f".tmp-step-{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        opt_tensors, opt_meta = _optimizer_to_flat(opt)
        files = {"model.safetensors": {k: v.contiguous() for k, v in model.state_dict().items()}}
        files["optimizer.safetensors"] = opt_tensors
        if ema is not None:
            files["ema.safetensors"] = ema.shadow
        state = json.dumps(
            {
                "step": step,
                "fingerprint": self.fp,
                "optimizer": opt_meta,
                "ema_updates": ema.updates if ema else None,
                "extra": extra or {},
            },
            default=str,
        )
        # tensor bytes + a generous safetensors header per tensor + a block per file
        n_tensors = sum(len(f) for f in files.values())
        needed = sum(t.nbytes for f in files.values() for t in f.values())
        needed += 256 * n_tensors + len(state) + 4096 * (len(files) + 2)
        hint = f"free space there or move {self.dir.parent} to a bigger disk"
        if needed > free_bytes(self.dir):
            raise _disk_full("checkpoint", final, needed, hint, errno.ENOSPC)
        try:
            tmp.mkdir()
            for name, tensors in files.items():
                save_file(tensors, tmp / name)
            (tmp / "state.json").write_text(state)
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            (final / "COMPLETE").write_text(self.fp)
            _fsync_dir(final)
            _fsync_dir(self.dir)
        except BaseException as exc:  # Ctrl-C included: never leave a partial directory
            shutil.rmtree(tmp, ignore_errors=True)
            if not (final / "COMPLETE").is_file():
                shutil.rmtree(final, ignore_errors=True)
            code = _disk_full_code(exc) if isinstance(exc, Exception) else None
            if code is None:
                raise
            raise _disk_full("checkpoint", final, needed, hint, code) from exc
        for old in self._complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def restore(self, model: torch.nn.Module, opt: torch.optim.Optimizer, ema: EMA | None) -> int:
        """Load the newest usable checkpoint; return the step to continue from (0 if none)."""
        for ckpt in reversed(self._complete()):
            try:
                state = json.loads((ckpt / "state.json").read_text())
                if state["fingerprint"] != self.fp:
                    # Made with other config or data: it can never be resumed, and left
                    # in place it would confuse "keep the last two".
                    if is_main():
                        say(f"removing stale checkpoint {ckpt.name} (other config/data)")
                        shutil.rmtree(ckpt, ignore_errors=True)
                    continue
                model.load_state_dict(load_file(ckpt / "model.safetensors"))
                _optimizer_from_flat(
                    opt, load_file(ckpt / "optimizer.safetensors"), state["optimizer"]
                )
                if ema is not None:
                    dev = str(next(model.parameters()).device)
                    ema.shadow = load_file(ckpt / "ema.safetensors", device=dev)
                    ema.updates = int(state["ema_updates"])
            except Exception as exc:  # corrupt/truncated files: fall back to the previous
                say(f"WARNING: checkpoint {ckpt} is unreadable ({exc}); trying an older one")
                continue
            say(f"resuming from {ckpt.name}")
            return int(state["step"])
        return 0


# ---- the loop -------------------------------------------------------------------------
@dataclass
class LoopCfg:
    steps: int
    lr: float
    warmup_steps: int
    grad_clip: float
    batch_size: int
    checkpoint_every: int
    log_every: int


@dataclass
class Trainer:
    """Runs ``step_fn(step) -> (loss, metrics)`` for ``cfg.steps`` steps.

    ``step_fn`` builds its batch from ``step`` alone (see ``batch_indices`` /
    ``step_generator``); everything else — LR, backward, clipping, optimizer, EMA,
    logging, checkpointing, resume — happens here, identically for every phase.
    """

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    cfg: LoopCfg
    checkpoints: Checkpointer
    log: MetricLogger = field(default_factory=NullLogger)
    ema: EMA | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def fit(
        self,
        step_fn: Callable[[int], tuple[torch.Tensor, StepMetrics]],
        every: int = 0,
        on_every: Callable[[int], None] | None = None,
    ) -> dict:
        """Train to ``cfg.steps``; ``on_every(step)`` runs after every ``every`` steps and
        after the last one (previews). It must not touch the global RNG or the weights."""
        from tqdm.auto import tqdm

        start = self.checkpoints.restore(self.model, self.optimizer, self.ema)
        self.model.train()
        main = is_main()
        bar = tqdm(
            total=self.cfg.steps,
            initial=start,
            disable=not main,
            desc=self.name,
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 10,
            file=sys.stderr,
        )
        t0, seen, last = time.perf_counter(), 0, {}
        # The NaN/Inf guard records the first bad step on the device and is read only at
        # log, checkpoint and preview steps: reading it every step would make the CPU wait
        # for the GPU each step. A diverged run still stops with the exact step, before
        # any checkpoint or preview of non-finite weights, and registers nothing.
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        bad_loss = torch.zeros((), device=self.device)

        def check_finite() -> None:
            if (at := int(first_bad)) >= 0:
                bar.close()
                raise TrainingDiverged(
                    f"{self.name}: loss is {bad_loss.item()} at step {at}; stopping "
                    "(lower the learning rate or check the data). Nothing was registered."
                )

        for step in range(start, self.cfg.steps):
            lr = cosine_lr(step, self.cfg.lr, self.cfg.warmup_steps, self.cfg.steps)
            for group in self.optimizer.param_groups:  # "lr_scale": e.g. a discriminator
                group["lr"] = lr * group.get("lr_scale", 1.0)
            with autocast(self.device):
                loss, metrics = step_fn(step)
            global_loss = all_mean(loss)  # every rank sees the same value: stop together
            new_bad = (first_bad < 0) & ~torch.isfinite(global_loss)
            first_bad = torch.where(new_bad, step, first_bad)
            bad_loss = torch.where(new_bad, global_loss.float(), bad_loss)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            sync_gradients(self.model)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model)
            seen += self.cfg.batch_size
            bar.update(1)
            checkpoint = (step + 1) % self.cfg.checkpoint_every == 0 or step + 1 == self.cfg.steps
            preview = bool(every) and ((step + 1) % every == 0 or step + 1 == self.cfg.steps)
            if (step + 1) % self.cfg.log_every == 0 or checkpoint or preview:
                check_finite()
            if (step + 1) % self.cfg.log_every == 0 or step + 1 == self.cfg.steps:
                rate = seen / max(1e-9, time.perf_counter() - t0)
                last = {
                    "loss": float(global_loss.item()),
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "samples_per_s": rate,
                    **{k: float(v) for k, v in metrics.items()},
                }
                bar.set_postfix(loss=f"{last['loss']:.4f}", sps=f"{rate:.0f}")
                if main:
                    self.log.log_metrics({f"{self.name}/{k}": v for k, v in last.items()}, step + 1)
            if checkpoint and main:
                try:
                    self.checkpoints.save(step + 1, self.model, self.optimizer, self.ema)
                except BaseException:  # e.g. DiskFull: the bar's last line before the error
                    bar.close()
                    raise
            if checkpoint and world_size() > 1:
                torch.distributed.barrier()  # no rank runs ahead of the newest checkpoint
            if main and on_every and preview:
                on_every(step + 1)
        bar.close()
        if self.ema is not None:
            self.ema.copy_to(self.model)
        self.model.eval()
        elapsed = time.perf_counter() - t0
        return {
            "train_seconds": elapsed,
            "samples_per_s": seen / max(elapsed, 1e-9),
            "final_loss": last.get("loss", float("nan")),
            "resumed_from_step": start,
        }


def stage_trainer(
    name: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    section: Any,
    seed: int,
    ckpt_dir: str | Path,
    data_id: Any,
    log: MetricLogger,
    ema_decay: float | None = None,
) -> Trainer:
    """The ``Trainer`` of a training stage: the model moved to ``device()``, loop knobs
    read from its config section, an EMA of the weights if ``ema_decay`` is given, and
    checkpoints fingerprinted by that section, the seed and ``data_id`` (whatever
    identifies the training data), so a checkpoint is only resumed into the same run.
    The optimizer may be made before: moving a module keeps its parameter objects."""
    dev = device()
    model.to(dev)
    knobs = {f.name: getattr(section, f.name) for f in dataclasses.fields(LoopCfg)}
    fp = fingerprint(section.model_dump(mode="json"), seed, data_id)
    return Trainer(
        name=name,
        model=model,
        optimizer=optimizer,
        cfg=LoopCfg(**knobs),
        checkpoints=Checkpointer(ckpt_dir, fp),
        log=log,
        ema=EMA(model, ema_decay) if ema_decay is not None else None,
        device=dev,
    )
