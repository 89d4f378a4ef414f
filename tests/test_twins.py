"""A stage that made a model the registry holds already takes that version
(``tracking/twins.py``): no copy, one line that says so, and for the pipeline no second
judgement.

The bug: every training stage re-ran on byte-identical data (one rejected picture
changed data/clean's hash), made the same weights and registered them again, kiln-vae v2
equal to v1 and so on, and a kiln-text2image version equal to the ``@champion`` that the
gate judged against itself and set aside as ``@challenger``.

The stages' own registration (``training.cli.stage._register``) on a real MLflow
registry (SQLite in a temporary folder), with small made-up safetensors folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.test_registry_restore import _client, _vae, _weights
from training import tracking
from training.cli.stage import _register
from training.inference.control import CONTROL_FILE
from training.tracking import twins

PARAMS = {"profile": "tiny", "seed": 0, "ingest": {"dataset": "shapes"}}


@pytest.fixture
def root(tmp_path: Path, monkeypatch) -> Path:
    """A project root of its own: its MLflow store, params.yaml, no parent run."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "KILN_PARENT_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resolved.json").write_text("{}")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    return tmp_path


def _pipeline(root: Path, guidance: float) -> None:
    """data/eval as evaluate leaves it: the same weights, served at ``guidance``."""
    pipeline = root / "data/eval/pipeline"
    _weights(pipeline / "unet", 1.0)
    (pipeline / "model_index.json").write_text("{}")
    (pipeline / "kiln_sampler.json").write_text(json.dumps({"guidance": guidance}))
    for name in ("report.html", "samples.png"):
        (root / "data/eval" / name).write_text(name)


def _stage(stage: str, metrics: dict) -> str:
    """The stage's registration, as ``kiln <stage>`` runs it after its phase."""
    with tracking.stage_run(stage, PARAMS, Path("resolved.json")) as tr:
        return _register(stage)(tr, metrics)


def _numbers(root: Path, name: str) -> list[str]:
    return sorted(str(v.version) for v in _client(root).search_model_versions(f"name='{name}'"))


def test_a_component_made_again_is_its_registered_version(root, capsys):
    _vae(root, 1.0)
    assert _stage("train_vae", {"loss": 0.1}) == "1"
    capsys.readouterr()
    assert _stage("train_vae", {"loss": 0.1}) == "1"  # was v2, the same weights
    assert "kiln-vae: weights unchanged, same as v1" in capsys.readouterr().err
    assert _numbers(root, "kiln-vae") == ["1"]
    _vae(root, 2.0)
    assert _stage("train_vae", {"loss": 0.2}) == "2"  # other weights: a new version
    _vae(root, 1.0)
    assert _stage("train_vae", {"loss": 0.1}) == "1"
    assert _numbers(root, "kiln-vae") == ["1", "2"]
    # copies registered before: the newest, or the champion where it is one of them
    with tracking.stage_run("train_vae", PARAMS, Path("resolved.json")) as tr:
        assert tracking.register_dir(tr, "kiln-vae", root / "data/models/vae", {}) == "3"
    assert _stage("train_vae", {"loss": 0.1}) == "3"
    _client(root).set_registered_model_alias("kiln-vae", "champion", "1")
    assert _stage("train_vae", {"loss": 0.1}) == "1"


def test_the_champion_made_again_stays_champion_and_is_not_judged_again(root, capsys):
    name = "kiln-text2image"
    client = _client(root)
    _pipeline(root, 5.0)
    assert _stage("evaluate", {"acc_all": 0.5}) == "1"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    capsys.readouterr()

    metrics = {"acc_all": 0.5}
    assert _stage("evaluate", metrics) == "1"  # was v2, judged against v1: @challenger
    err = capsys.readouterr().err
    assert "kiln-text2image: weights unchanged, same as v1 (@champion;" in err
    assert "gate:" not in err  # not judged again
    assert metrics["gate_decision"] == "champion" and metrics["same_weights_as"] == "1"
    assert _numbers(root, name) == ["1"]
    aliases = client.get_registered_model(name).aliases
    assert {a: str(v) for a, v in aliases.items()} == {"champion": "1"}

    # the same weights served at another guidance: another model to serve, judged
    _pipeline(root, 7.0)
    assert _stage("evaluate", {"acc_all": 0.5}) == "2"
    err = capsys.readouterr().err
    assert "weights unchanged, same as v1, but served with other settings" in err
    assert client.get_model_version(name, "2").tags["gate_decision"] == "challenger"
    _pipeline(root, 5.0)
    assert _stage("evaluate", {"acc_all": 0.5}) == "1"  # served as v1 again
    assert _numbers(root, name) == ["1", "2"]


def test_the_shipped_controlnet_settings_are_the_served_ones():
    """twins.py names the detector file by value (importing inference/control.py would
    add it to every stage's DVC deps): the same name as the ControlNet writes."""
    assert CONTROL_FILE in twins.CONTROLNET_SERVED


def test_a_component_an_older_kiln_registered_is_matched_by_its_files(root, capsys):
    """After an upgrade every stage re-runs (its code changed) and trains the same
    weights; a version registered before ``kiln.weights`` existed was never matched,
    so kiln-vae v2 equal to v1 was registered (seen upgrading a 2026-12-04 project)."""
    _vae(root, 1.0)
    assert _stage("train_vae", {"loss": 0.1}) == "1"
    client = _client(root)
    client.delete_model_version_tag("kiln-vae", "1", "kiln.weights")  # as an older Kiln left it
    capsys.readouterr()
    assert _stage("train_vae", {"loss": 0.1}) == "1"  # was v2, the same weights
    assert "kiln-vae: weights unchanged, same as v1" in capsys.readouterr().err
    assert _numbers(root, "kiln-vae") == ["1"]
    assert client.get_model_version("kiln-vae", "1").tags.get("kiln.weights")  # hashed once
    _vae(root, 2.0)
    assert _stage("train_vae", {"loss": 0.2}) == "2"  # other weights: still a new version
