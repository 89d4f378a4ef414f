"""`kiln run --dataset digits` runs the same pipeline on the built-in digits set
(a few training steps: this checks the path, the quality targets live in the Models
issue's benchmarks)."""

import json

import pytest

from training import config

from .conftest import kiln

pytestmark = pytest.mark.e2e


def test_digits_pipeline_runs_and_records_the_dataset(project):
    config.set_values(
        project / "params.yaml",
        {
            "ingest.num_samples": 400,
            "train_vae.steps": 20,
            "train_clip.steps": 20,
            "train_unet.steps": 20,
            "evaluate.max_prompts": 10,
            "evaluate.steps": 5,
        },
    )
    proc = kiln(project, "run", "--dataset", "digits", timeout=1500)
    assert "params.yaml: ingest.dataset: shapes -> digits" in proc.stdout
    assert "dataset: digits" in (project / "params.yaml").read_text()
    report = json.loads((project / "data" / "raw" / "report.json").read_text())
    assert report["dataset"] == "digits" and report["successes"] == 400
    metrics = json.loads((project / "data" / "metrics" / "evaluate.json").read_text())
    assert 0.0 <= metrics["acc_digit"] <= 1.0 and metrics["samples"] == 20
    assert "models:/kiln-text2image/1" in proc.stdout
