"""A training stage killed with SIGKILL mid-run resumes from its last checkpoint when run
again, and ends with weights bitwise identical to an uninterrupted run (the Models
issue's resume test, on the real `kiln train-vae` process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from training import config

from .conftest import kiln, sigkill_after_checkpoint

pytestmark = pytest.mark.e2e
WEIGHTS = Path("data/models/vae/diffusion_pytorch_model.safetensors")
CKPT = Path("data/checkpoints/train_vae")


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
    assert not (project / CKPT).exists()  # finished: its resume state is gone

    killed_at = sigkill_after_checkpoint(project, "train-vae", project / CKPT, 20)
    assert 20 <= killed_at < 80, killed_at

    resumed = kiln(project, "train-vae")
    assert "resuming from step-" in resumed.stderr
    weights = load_file(project / WEIGHTS)
    assert weights.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert (weights[name] == tensor).all(), name

    # A finished stage leaves no resume state, so running it again (as DVC does after a
    # code change, which the checkpoints' fingerprint cannot see) trains every step
    # again instead of "resuming" at the last one and re-registering the old weights.
    assert not (project / CKPT).exists()
    again = kiln(project, "train-vae")
    assert "resuming from step-" not in again.stderr
    metrics = json.loads((project / "data/metrics/train_vae.json").read_text())
    assert (metrics["resumed_from_step"], metrics["steps_trained"]) == (0, 80)
