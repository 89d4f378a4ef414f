"""Several projects on one MLflow server: ``KILN_REGISTRY_PREFIX`` keeps their models
apart. With fixed names a second project's gate judged its version against the first
project's champion and, winning, took ``@champion`` from it: the first project's
``kiln generate`` then drew the second's pictures, and its weekly `mode: continue` run
stopped on "trained on another collection"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from training import config

ROOT = Path(__file__).resolve().parents[1]

PROJECT = """
from mlflow import MlflowClient
from training.stages import PIPELINE_MODEL
from training.tracking.gate import promote
from training.tracking.store import EXPERIMENT, setup
setup()
client = MlflowClient()
try:
    client.create_registered_model(PIPELINE_MODEL)
except Exception:
    pass
v = client.create_model_version(PIPELINE_MODEL, source="file:///nowhere").version
decision = promote(PIPELINE_MODEL, str(v), {"fd_clip_ratio": 1.2}, "fd_clip_ratio", 0.0)
print(PIPELINE_MODEL, EXPERIMENT, v, decision["gate_decision"])
"""


def _project(db: Path, prefix: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KILN_REGISTRY_PREFIX"}
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{db}", "MLFLOW_REGISTRY_URI": f"sqlite:///{db}"}
    if prefix is not None:
        env["KILN_REGISTRY_PREFIX"] = prefix
    return subprocess.run(
        [sys.executable, "-c", PROJECT], cwd=db.parent, env=env, capture_output=True, text=True
    )


def test_two_projects_on_one_registry_keep_their_own_champions(tmp_path):
    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    first = _project(db, None)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["kiln-text2image", "kiln", "1", "champion"]
    other = _project(db, "pets-")
    assert other.returncode == 0, other.stderr
    # its own model and experiment, and its first version is its own first champion
    assert other.stdout.split() == ["pets-kiln-text2image", "pets-kiln", "1", "champion"]
    client = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    assert str(client.get_model_version_by_alias("kiln-text2image", "champion").version) == "1"
    assert len(client.search_model_versions("name='kiln-text2image'")) == 1


def test_a_prefix_that_cannot_name_a_model_is_refused_by_name(tmp_path):
    bad = _project(tmp_path / "mlflow.db", "my project/")
    assert bad.returncode == 1
    assert "KILN_REGISTRY_PREFIX='my project/'" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.fixture
def registry(tmp_path: Path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_a_champion_of_another_collection_is_named(registry):
    """What evaluate's warning reads: the champion's collection when it is not this
    run's (another project under the same names, or a change of data)."""
    from training.stages import PIPELINE_MODEL
    from training.tracking.lineage import other_collection

    registry.create_registered_model(PIPELINE_MODEL)
    v = registry.create_model_version(PIPELINE_MODEL, source="file:///nowhere").version
    digits = config.resolve({"ingest": {"dataset": "digits"}})
    assert other_collection(digits, v) == ""  # records nothing
    registry.set_model_version_tag(PIPELINE_MODEL, v, "kiln.dataset", "shapes")
    assert other_collection(digits, v) == "dataset shapes"
    assert other_collection(config.resolve({"ingest": {"dataset": "shapes"}}), v) is None
