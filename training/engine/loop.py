"""The training loop shared by the VAE, CLIP and U-Net phases, written once.

``Trainer.fit`` runs a phase's ``step_fn(step) -> (loss, metrics)``: LR schedule, NaN/Inf
guard, gradient clipping, EMA, progress bar with loss and samples/s, per-step metrics,
checkpoints and resume happen here, identically for every phase. Randomness and batch
order are pure functions of ``(seed, step)`` (``engine.batches``), so resuming at step k
needs only the weights and optimizer state, and a resumed run is bitwise identical to an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.config import fingerprint
from training.engine.batches import StepMetrics, autocast, cosine_lr, served
from training.engine.checkpoint import Checkpointer
from training.engine.distributed import (
    all_mean,
    all_sum,
    device,
    is_main,
    rank,
    sync_gradients,
    world_size,
)
from training.engine.ema import EMA
from training.errors import TrainingDiverged
from training.tracker import MetricLogger, NullLogger


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

    def _clip(self) -> torch.Tensor:
        """Clip the gradient norm at ``grad_clip``; returns every group's norm (the first
        is logged; all are checked: a non-finite norm makes clipping scale every
        gradient by NaN). A model made of networks that must not scale each other's
        steps (the VAE and its discriminator) names them in ``clip_groups()``: each is
        clipped on its own. Clipped together, a large discriminator gradient would
        shrink the VAE's step, and the other way round."""
        clip = torch.nn.utils.clip_grad_norm_
        groups = getattr(self.model, "clip_groups", None)
        if groups is None:
            return clip(self.model.parameters(), self.cfg.grad_clip).reshape(1)
        return torch.stack([clip(g, self.cfg.grad_clip) for g in groups()])

    def _same_start(self, start: int) -> None:
        """Every rank restores its own checkpoint folder; only rank 0 writes one. On
        nodes that do not share data/ (splits in object storage) the others find none
        and would start at 0 from fresh weights while rank 0 resumes, averaging
        gradients of different models. All ranks compare (the same sums on each, so the
        same verdict) and stop together, before any step."""
        if world_size() == 1:
            return
        total, squares = all_sum([float(start), float(start) ** 2])
        if squares * world_size() != total**2:  # equal only when every start is equal
            raise RuntimeError(
                f"{self.name}: the ranks found different checkpoints to resume from (rank "
                f"{rank()}: step {start}): rank 0 writes them to {self.checkpoints.dir}, "
                "which every node must share to resume; delete it to start over, or "
                "put data/ on shared storage"
            )

    def fit(
        self,
        step_fn: Callable[[int], tuple[torch.Tensor, StepMetrics]],
        every: int = 0,
        on_every: Callable[[int], None] | None = None,
        stop: Callable[[int], bool] | None = None,
    ) -> dict:
        """Train to ``cfg.steps``; ``on_every(step)`` runs after every ``every`` steps and
        after the last one (previews). It must not touch the global RNG or the weights.

        ``stop(step)``, asked at the same points before the last step, ends training
        early when it returns True (a validation target reached). It must depend on the
        weights alone (the trained ones: an EMA is copied in only after the loop) and
        agree on every rank: a run resumed at a check step asks again of the restored
        weights, so it stops, or goes on, as the uninterrupted run did."""
        from tqdm.auto import tqdm

        start = self.checkpoints.restore(self.model, self.optimizer, self.ema)
        self._same_start(start)
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
        # the last logged metrics travel in the checkpoint: a run resumed at its end
        # (killed after the last save) reports the final loss it reached
        t0, seen, last = time.perf_counter(), 0, dict(self.checkpoints.extra.get("last", {}))
        end = self.cfg.steps

        def stops_at(step: int) -> bool:  # a check step before the last; then stop's answer
            on_check = bool(every) and step % every == 0 and step < self.cfg.steps
            return bool(stop and on_check and stop(step))

        if start and stops_at(start):  # resumed where the interrupted run had stopped
            end = start
        # The NaN/Inf guard records the first bad step on the device and is read only at
        # log, checkpoint and preview steps: reading it every step would make the CPU wait
        # for the GPU each step. A diverged run still stops with the exact step, before
        # any checkpoint or preview of non-finite weights, and registers nothing. It reads
        # the gradient norm as well as the loss: a finite loss can have non-finite
        # gradients (a sqrt or log at 0), and their step makes every weight NaN.
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        bad = torch.zeros(2, device=self.device)  # (loss, gradient norm) at that step

        def check_finite() -> None:
            if (at := int(first_bad)) >= 0:
                bar.close()
                loss, norm = bad.tolist()
                what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
                raise TrainingDiverged(
                    f"{self.name}: {what} at step {at}; stopping "
                    "(lower the learning rate or check the data). Nothing was registered."
                )

        for step in range(start, end):
            lr = cosine_lr(step, self.cfg.lr, self.cfg.warmup_steps, self.cfg.steps)
            for group in self.optimizer.param_groups:  # "lr_scale": e.g. a discriminator
                group["lr"] = lr * group.get("lr_scale", 1.0)
            before = served()
            with autocast(self.device):
                loss, metrics = step_fn(step)
            global_loss = all_mean(loss)  # every rank sees the same value: stop together
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            sync_gradients(self.model)  # the same gradients, so the same norms, on every rank
            norms = self._clip()
            grad_norm = norms[0]
            seen_now = torch.stack([global_loss.float().reshape(()), norms.float().sum()])
            new_bad = (first_bad < 0) & ~torch.isfinite(seen_now).all()
            first_bad = torch.where(new_bad, step, first_bad)
            bad = torch.where(new_bad, seen_now, bad)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model)
            # the global batch a loader served, which may be less than batch_size (and
            # batch_size for a step that drew its batch some other way)
            seen += (served() - before) or self.cfg.batch_size
            bar.update(1)
            checkpoint = (step + 1) % self.cfg.checkpoint_every == 0 or step + 1 == self.cfg.steps
            preview = bool(every) and ((step + 1) % every == 0 or step + 1 == self.cfg.steps)
            if (step + 1) % self.cfg.log_every == 0 or checkpoint or preview:
                check_finite()
            # asked after the guard (never of non-finite weights); a stop is the run's
            # last step: logged, and checkpointed so that a resume finds where it ended
            stop_now = stops_at(step + 1)
            checkpoint = checkpoint or stop_now
            if (step + 1) % self.cfg.log_every == 0 or step + 1 == self.cfg.steps or stop_now:
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
                    self.checkpoints.save(
                        step + 1, self.model, self.optimizer, self.ema, {"last": last}
                    )
                except BaseException:  # e.g. DiskFull: the bar's last line before the error
                    bar.close()
                    raise
            if checkpoint and world_size() > 1:
                torch.distributed.barrier()  # no rank runs ahead of the newest checkpoint
            if main and on_every and preview:
                try:
                    on_every(step + 1)
                except BaseException:  # e.g. NonFiniteSamples: the bar ends before the error
                    bar.close()
                    raise
            if stop_now:
                end = step + 1
                break
        if start == end and main and on_every and every:
            # resumed where the run had ended (its last step, or an early stop at a check
            # step): the preview made there is drawn again, of the same restored weights
            on_every(start)
        bar.close()
        if self.ema is not None:
            self.ema.copy_to(self.model)
        self.model.eval()
        elapsed = time.perf_counter() - t0
        summary = {
            "train_seconds": elapsed,
            "samples_per_s": seen / max(elapsed, 1e-9),
            "final_loss": last.get("loss", float("nan")),
            "resumed_from_step": start,
            "steps_trained": end,
        }
        if self.ema is not None:  # the warm-up caps short runs below ema_decay (ema.py)
            summary["ema_decay_reached"] = self.ema.reached
        return summary


# a section's knobs that say when a step is logged or checkpointed, not what it does
OBSERVING = ("log_every", "checkpoint_every")


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
    # how often it logs and saves changes no weight: a run stopped to save more often
    # resumes (was: its checkpoints removed as "other config", trained from step 0)
    config = section.model_dump(mode="json", exclude=set(OBSERVING))
    fp = fingerprint(config, seed, data_id)
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
