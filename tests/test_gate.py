"""The promotion gate on a real MLflow registry (SQLite): higher-is-better metrics and
distances, where lower wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from training import config


@pytest.fixture
def registry(tmp_path: Path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    client.create_registered_model("m")
    yield client
    mlflow.set_tracking_uri(None)


def _version(client, metric: str, value: float) -> str:
    v = client.create_model_version("m", source="file:///nowhere")
    client.set_model_version_tag("m", v.version, f"metric.{metric}", str(value))
    return str(v.version)


@pytest.mark.parametrize(
    "metric, values, decisions",
    [
        (
            "fd_clip_ratio",
            [2.0, 1.5, 1.8, 1.45],
            ["champion", "champion", "challenger", "champion"],
        ),
        ("acc_all", [0.5, 0.7, 0.6, 0.75], ["champion", "champion", "challenger", "champion"]),
    ],
)
def test_the_gate_knows_which_way_is_better(registry, metric, values, decisions):
    from training.tracking.registry import promote

    got = []
    for value in values:
        version = _version(registry, metric, value)
        gate = promote("m", version, {metric: value}, metric, min_delta=0.02)
        got.append(gate["gate_decision"])
    # the last one beat the champion by 0.05 (> min_delta 0.02) in its direction
    assert got == decisions
    assert gate["gate_direction"] == ("lower" if metric == "fd_clip_ratio" else "higher")
    assert str(registry.get_model_version_by_alias("m", "champion").version) == version


def test_user_data_gates_on_the_distance_to_real_images_not_on_clip_score():
    user = config.resolve({"ingest": {"dataset": "folder", "source": "/x"}})
    assert user.gate_metric() == "fd_clip_ratio" in config.GATE_LOWER_IS_BETTER
    assert config.resolve({}).gate_metric() == "acc_all"
