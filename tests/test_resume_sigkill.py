"""A training stage killed with SIGKILL mid-run resumes from its last checkpoint when run
again, and ends with weights bitwise identical to an uninterrupted run (the Models
issue's resume test, on the real `kiln train-vae` process)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from training import config

from .conftest import BIN, kiln, project_env

pytestmark = pytest.mark.e2e
WEIGHTS = Path("data/models/vae/diffusion_pytorch_model.safetensors")
CKPT = Path("data/checkpoints/train_vae")


def _complete_steps(project: Path) -> list[int]:
    return sorted(
        int(p.name.split("-")[1])
        for p in (project / CKPT).glob("step-*")
        if (p / "COMPLETE").is_file()
    )


def test_sigkilled_training_resumes_bitwise_identical(project):
    config.set_values(
        project / "params.yaml",
        {
            "ingest.num_samples": 300,
            "train_vae.steps": 80,
            "train_vae.batch_size": 16,
            "train_vae.checkpoint_every": 10,
        },
    )
    kiln(project, "ingest")
    kiln(project, "validate")

    kiln(project, "train-vae")
    uninterrupted = load_file(project / WEIGHTS)
    shutil.rmtree(project / CKPT)

    proc = subprocess.Popen(
        [str(BIN / "kiln"), "train-vae"],
        cwd=project,
        env=project_env(project),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not any(s >= 20 for s in _complete_steps(project)):
        assert proc.poll() is None, "train-vae finished before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _complete_steps(project)[-1]
    assert 20 <= killed_at < 80, killed_at

    resumed = kiln(project, "train-vae")
    assert "resuming from step-" in resumed.stderr
    weights = load_file(project / WEIGHTS)
    assert weights.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert (weights[name] == tensor).all(), name
