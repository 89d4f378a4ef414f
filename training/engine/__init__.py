"""The training engine: everything the VAE, CLIP and U-Net phases share, written once.

Phases import this package as one namespace (``from training import engine as E``):

* ``loop``: ``Trainer.fit`` — LR schedule, NaN/Inf guard, clipping, EMA, progress bar,
  per-step metrics, checkpoints, resume;
* ``batches``, ``order``: noise, learning rate and batch order as pure functions of
  ``(seed, step)``; ``loaders``: where batches come from (streamed or in memory);
* ``distributed``: the device, torch's threads, data parallelism under torchrun;
* ``checkpoint``: atomic safetensors checkpoints; ``ema``: the weights' moving average;
* ``images``: tensor/uint8 conversion, PSNR/SSIM and picture grids.

Engine code knows torch, never a phase, MLflow or Prefect.
"""

from training.config import fingerprint
from training.console import say
from training.disk import DiskFull, disk_full_errors, write_json
from training.engine.batches import (
    StepMetrics,
    autocast,
    batch_indices,
    cosine_lr,
    step_generator,
    to_device,
)
from training.engine.checkpoint import Checkpointer
from training.engine.distributed import (
    all_mean,
    barrier,
    device,
    gather,
    init_distributed,
    is_main,
    local,
    rank,
    set_torch_threads,
    sync_gradients,
    world_size,
)
from training.engine.ema import EMA
from training.engine.loop import LoopCfg, Trainer, stage_trainer
from training.errors import TrainingDiverged
from training.tracker import MetricLogger, NullLogger

__all__ = [
    "EMA",
    "Checkpointer",
    "DiskFull",
    "LoopCfg",
    "MetricLogger",
    "NullLogger",
    "StepMetrics",
    "Trainer",
    "TrainingDiverged",
    "all_mean",
    "autocast",
    "barrier",
    "batch_indices",
    "cosine_lr",
    "device",
    "disk_full_errors",
    "fingerprint",
    "gather",
    "init_distributed",
    "is_main",
    "local",
    "rank",
    "say",
    "set_torch_threads",
    "step_generator",
    "stage_trainer",
    "sync_gradients",
    "to_device",
    "world_size",
    "write_json",
]
