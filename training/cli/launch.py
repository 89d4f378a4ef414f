"""Data-parallel launch: ``KILN_NPROC=N`` runs a stage as N processes under torchrun.

Like ``KILN_DEVICE`` it is an environment setting, not a param: the global batch, and so
the result, does not depend on it, so DVC must not call outputs stale over it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import typer

from training.cli.base import fail, load_params
from training.tracker import NullLogger


def relaunch_under_torchrun(stage: str) -> bool:
    """``KILN_NPROC=N`` (N > 1): run this stage as N data-parallel processes under
    ``torchrun --standalone`` (gloo on the CPU, NCCL on GPUs); True once they are done.
    Multi-node: run ``torchrun --nnodes ... -m training.cli train-unet`` yourself."""
    try:
        n = int(os.environ.get("KILN_NPROC", "1"))
    except ValueError:
        fail(f"KILN_NPROC must be a whole number, got {os.environ['KILN_NPROC']!r}")
    if n <= 1 or "WORLD_SIZE" in os.environ:
        return False
    typer.echo(f"[kiln] {stage}: {n} data-parallel processes (torchrun)", err=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n}",
        "-m",
        "training.cli",
        stage.replace("_", "-"),
    ]
    rc = subprocess.call(cmd)
    if rc != 0:
        fail(f"{stage}: a data-parallel process failed (exit {rc}); its error is above")
    return True


def is_follower() -> bool:
    """Whether this is rank 1..N-1 of a torchrun launch (read from the environment, so
    the data stages never load torch to ask)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0


def follow(stage: str, body: Callable[..., dict]) -> dict:
    """Ranks 1..N-1: train in lockstep with rank 0, which alone logs, checkpoints,
    saves and registers."""
    try:
        body(load_params(), NullLogger())  # rank 0 alone logs; the phase joins the group
    except Exception as exc:
        if os.environ.get("KILN_DEBUG"):
            raise
        fail(f"{stage} (rank {os.environ.get('RANK')}): {exc}")
    return {}
