"""A training stage killed with SIGKILL mid-run resumes from its last checkpoint when run
again, and ends with weights bitwise identical to an uninterrupted run (the Models
issue's resume test, on the real `kiln train-vae` process)."""

from __future__ import annotations

import json
from pathlib import Path
from signal import SIGTERM

import pytest
from safetensors.torch import load_file

from training import config

from .conftest import kiln, sigkill_after_checkpoint, signal_after_checkpoint
from .test_interrupt import _runs

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


def test_sigterm_stops_a_stage_as_ctrl_c_does_and_asks_for_a_retry(project):
    """Was: SIGTERM (Kubernetes evicting a pod, systemd, a scheduler) killed `kiln
    train-vae` on the spot: its MLflow run stayed RUNNING, half an output was left and
    no note told the flow that a retry (which resumes) would help."""
    config.set_values(
        project / "params.yaml",
        {"ingest.num_samples": 300, "train_vae.steps": 400, "train_vae.checkpoint_every": 10},
    )
    kiln(project, "ingest")
    kiln(project, "validate")
    step, rc, err = signal_after_checkpoint(project, "train-vae", project / CKPT, 10, SIGTERM)
    assert rc == 130, err[-2000:]
    assert "train_vae: terminated (SIGTERM)" in err and "Traceback" not in err, err[-2000:]
    note = json.loads((project / ".kiln/failed-train_vae.json").read_text())
    assert note == {"message": "terminated (SIGTERM)", "retry": True}
    assert not (project / "data/models/vae").exists() or not any(
        (project / "data/models/vae").iterdir()
    )
    assert any((project / CKPT).glob("step-*"))  # kept: the retry resumes
    assert [s for name, s in _runs(project).values() if name == "train_vae"] == ["KILLED"]
