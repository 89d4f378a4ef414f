"""``kiln run`` registers a stage's output only when no version carries its weights
(``tracking.registry.ensure_registered``).

The bug: a stage run outside the flow (``dvc repro``, the ``kiln-stage`` deployment,
``kiln <stage>``) registered its version without the ``dvc.out.*`` tag that only the
flow adds; the next ``kiln run`` found every stage up to date, looked for that tag, did
not find it, and registered the same weights again as "restored from the DVC cache"
(for evaluate: a copy sent through the gate again). Now each version carries its
weights' fingerprint (``kiln.weights``) and the flow matches on it first; weights no
version carries are still registered as restored.

On a real MLflow registry (SQLite in a temporary folder), registered by the stages' own
code (``register_dir``, ``register_text2image`` and ``promote`` in a stage run) and
looked up as the flow does (``ensure_registered`` in a pipeline run). Small made-up
safetensors folders stand in for trained models: a few seconds a test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from training import tracking
from training.tracking import resume

PARAMS = {"profile": "tiny", "seed": 0, "ingest": {"dataset": "shapes"}}
VAE_OUT, EVAL_OUT = "data/models/vae", "data/eval"
GATE = ("acc_all", 0.0)


@pytest.fixture
def root(tmp_path: Path, monkeypatch) -> Path:
    """A project root of its own: its MLflow store (``root/mlflow.db``), no parent run."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "KILN_PARENT_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resolved.json").write_text("{}")
    return tmp_path


def _client(root: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _weights(folder: Path, value: float) -> None:
    """A safetensors file with a tensor of ``value`` (the "trained" weights)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.full((4, 4), value, np.float32)}, folder / "model.safetensors")


def _vae(root: Path, value: float) -> Path:
    """``data/models/vae`` as train_vae leaves it: weights and the config that the
    version's MLmodel signature is read from."""
    folder = root / VAE_OUT
    _weights(folder, value)
    config = {"sample_size": 32, "block_out_channels": [8, 16], "in_channels": 3}
    (folder / "config.json").write_text(json.dumps({**config, "latent_channels": 4}))
    return folder


def _pipeline(root: Path) -> Path:
    """``data/eval/pipeline`` as evaluate leaves it (the parts register_text2image reads)."""
    pipeline = root / EVAL_OUT / "pipeline"
    _weights(pipeline / "unet", 1.0)
    (pipeline / "model_index.json").write_text("{}")
    return pipeline


def _locked(root: Path, stage: str, out: str, md5: str, metrics: dict) -> None:
    """What DVC and the stage leave once the stage ran: its out in dvc.lock, its metrics."""
    lock = {"schema": "2.0", "stages": {stage: {"outs": [{"path": out, "md5": md5}]}}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    (root / "data/metrics").mkdir(parents=True, exist_ok=True)
    (root / f"data/metrics/{stage}.json").write_text(json.dumps(metrics))


def _stage_registers_vae(root: Path) -> tuple[str, str]:
    """``kiln train_vae``'s registration, outside any pipeline run (as ``dvc repro`` or
    the kiln-stage deployment runs it): (version, run id)."""
    with tracking.stage_run("train_vae", PARAMS, root / "resolved.json", root=root) as tr:
        version = tracking.register_dir(tr, "kiln-vae", root / VAE_OUT, {"loss": 0.1})
        return version, tr.run_id


def _flow_ensures(root: Path, stage: str, **kw) -> str | None:
    """What ``kiln run`` does after a stage that DVC found up to date."""
    with tracking.pipeline_run(PARAMS, root) as parent:
        return tracking.ensure_registered(parent, stage, root, **kw)


def _numbers(root: Path, name: str) -> list[str]:
    return sorted(str(v.version) for v in _client(root).search_model_versions(f"name='{name}'"))


def test_a_component_a_stage_registered_outside_the_flow_is_not_registered_again(root):
    _vae(root, 1.0)
    version, run_id = _stage_registers_vae(root)
    metrics = {"loss": 0.1, "registered_version": version, "mlflow_run_id": run_id}
    _locked(root, "train_vae", VAE_OUT, "abc.dir", metrics)
    assert _flow_ensures(root, "train_vae") == version == "1"
    assert _numbers(root, "kiln-vae") == ["1"]  # was ["1", "2"], v2 "restored"
    tags = _client(root).get_model_version("kiln-vae", "1").tags
    assert tags[f"dvc.out.{VAE_OUT}"] == "abc.dir" and "kiln.restored_from" not in tags
    assert _flow_ensures(root, "train_vae") == "1"  # the next run: by the dvc.out tag


def test_of_versions_with_the_same_weights_the_one_the_stage_recorded_is_taken(root):
    """An evaluation re-run registers the same weights again (a finished registration is
    never resumed): the flow takes the version the stage's metrics name, else the newest."""
    _vae(root, 1.0)
    first, run_id = _stage_registers_vae(root)
    second, _ = _stage_registers_vae(root)
    assert (first, second) == ("1", "2")
    _locked(root, "train_vae", VAE_OUT, "abc.dir", {"registered_version": first})
    assert _flow_ensures(root, "train_vae") == "1"
    _locked(root, "train_vae", VAE_OUT, "def.dir", {"loss": 0.1})  # recorded nothing
    assert _flow_ensures(root, "train_vae") == "2"
    assert _numbers(root, "kiln-vae") == ["1", "2"]


def test_weights_no_version_carries_are_still_registered_as_restored(root):
    """The registry holds other weights only (or nothing: a wiped registry, a new
    server): the output DVC restored is registered, tagged as restored, once."""
    _vae(root, 1.0)
    _stage_registers_vae(root)
    _vae(root, 2.0)  # DVC restored other weights from its cache; their stage never ran
    _locked(root, "train_vae", VAE_OUT, "other.dir", {"loss": 0.2, "registered_version": "1"})
    (root / "params.yaml").write_text(yaml.safe_dump({"ingest": {"dataset": "digits"}}))
    assert _flow_ensures(root, "train_vae") == "2"
    tags = _client(root).get_model_version("kiln-vae", "2").tags
    assert tags["kiln.restored_from"] == "dvc-cache"
    # its collection, as a stage-registered version's (was: none, so mode continue
    # built on a restored champion of any collection with only a warning)
    assert tags["kiln.dataset"] == "digits"
    assert _client(root).get_model_version("kiln-vae", "1").tags["kiln.dataset"] == "shapes"
    assert tags[resume.WEIGHTS_TAG] == resume.folder_fingerprint(root / VAE_OUT)
    assert tags[f"dvc.out.{VAE_OUT}"] == "other.dir"
    assert _flow_ensures(root, "train_vae") == "2"
    assert _numbers(root, "kiln-vae") == ["1", "2"]


def test_an_evaluate_run_by_hand_is_not_registered_nor_judged_again(root):
    """The reviewer's case: ``flows.stage.kiln_stage(stage='evaluate')`` registered and
    judged kiln-text2image v1; then ``kiln run`` (every stage up to date) registered v2
    with the same metrics under an "evaluate (restored)" run and judged it again."""
    pipeline = _pipeline(root)
    metrics = {"acc_all": 0.5}
    with tracking.stage_run("evaluate", PARAMS, root / "resolved.json", root=root) as tr:
        version = tracking.register_text2image(tr, "kiln-text2image", pipeline, metrics)
        tracking.promote("kiln-text2image", version, metrics, *GATE)
        tracking.gate.publish_card(tr, "kiln-text2image", version, "card", [])  # finished
    _locked(root, "evaluate", EVAL_OUT, "eval.dir", {**metrics, "registered_version": version})
    assert _flow_ensures(root, "evaluate", gate=GATE, components={}) == version == "1"
    assert _numbers(root, "kiln-text2image") == ["1"]
    client = _client(root)
    assert str(client.get_model_version_by_alias("kiln-text2image", "champion").version) == "1"
    restored = client.search_runs(
        [client.get_experiment_by_name("kiln").experiment_id],
        filter_string="tags.`kiln.restored_from` = 'dvc-cache'",
    )
    assert restored == []  # no "evaluate (restored)" run


def test_an_evaluate_whose_registration_did_not_finish_is_finished_not_copied(root):
    """Its stage was stopped after registering v1, before the gate: the flow's restore
    takes v1 over (``resume.py``) and judges it, as before; no v2."""
    pipeline = _pipeline(root)
    metrics = {"acc_all": 0.5}
    with tracking.stage_run("evaluate", PARAMS, root / "resolved.json", root=root) as tr:
        version = tracking.register_text2image(tr, "kiln-text2image", pipeline, metrics)
    _locked(root, "evaluate", EVAL_OUT, "eval.dir", metrics)
    assert _flow_ensures(root, "evaluate", gate=GATE, components={}) == version == "1"
    assert _numbers(root, "kiln-text2image") == ["1"]
    tags = _client(root).get_model_version("kiln-text2image", "1").tags
    assert tags["gate_decision"] == "champion" and resume.FINISHED_TAG in tags


def test_the_pipeline_names_its_components_by_this_registrys_numbers(root):
    """DVC restored train_vae onto another MLflow server: its metrics say
    ``registered_version: 1``, the number where it ran, but here v1 holds other weights
    and the flow registered the restored ones as v2. evaluate tagged the pipeline with
    v1 (its metrics' number), so a promotion crowned the wrong VAE; it now names v2."""
    from training.tracking import components

    _vae(root, 1.0)
    _stage_registers_vae(root)  # this registry's v1: other weights
    _vae(root, 2.0)
    _locked(root, "train_vae", VAE_OUT, "other.dir", {"loss": 0.2, "registered_version": "1"})
    assert _flow_ensures(root, "train_vae") == "2"  # registered here as restored
    assert components.built_from(root) == {"kiln-vae": "2"}
    _vae(root, 1.0)  # the stage's own weights again: the number it recorded holds them
    assert components.built_from(root) == {"kiln-vae": "1"}


def test_a_restored_pipeline_gets_its_data_tags_and_model_card(root):
    """Found in review: a version registered from the DVC cache (after ``make clean``, in
    a fresh clone, against a new MLflow server) had no ``kiln.data``/``kiln.rows_*``
    tags and no model card, though the README promises both for every version."""
    _pipeline(root)
    lock = {
        "schema": "2.0",
        "stages": {
            "validate": {"outs": [{"path": "data/clean", "md5": "clean.dir"}]},
            "evaluate": {"outs": [{"path": EVAL_OUT, "md5": "eval.dir"}]},
        },
    }
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    (root / "data/metrics").mkdir(parents=True, exist_ok=True)
    (root / "data/metrics/evaluate.json").write_text(json.dumps({"acc_all": 0.5}))
    (root / "data/metrics/ingest.json").write_text(json.dumps({"rows_new": 7, "rows_kept": 0}))
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    assert _flow_ensures(root, "evaluate", gate=GATE, components={}) == "1"
    version = _client(root).get_model_version("kiln-text2image", "1")
    assert version.tags["kiln.restored_from"] == "dvc-cache"
    assert version.tags["kiln.data"] == "clean.dir" and version.tags["kiln.rows_new"] == "7"
    assert version.description.startswith("# kiln-text2image v1")
    assert "**Gate: @champion.**" in version.description
    assert version.tags[resume.FINISHED_TAG]
