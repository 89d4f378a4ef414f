"""An evaluate stopped after it registered its version is finished by the re-run, not
repeated (``training/tracking/resume.py``): one version for the weights, the gate's
decision kept (a winner is ``@champion``, a loser never crowned), its lineage tags and
its card written, the card comparing it with the champion it was judged against.

The stage runs for real: ``kiln evaluate`` in a project copy with the shapes set
ingested and validated and random-weight models where the trained ones would be
(``test_serving.build_tiny_pipeline``: nothing trained), about 30 s a run on 2 cores.
The stop is a SIGKILL of that process at one step of its registration (the step's
function replaced, in that process only, by one that kills it); then the same command
again. The registry tests of the gate's side (a real SQLite registry, as
``test_gate.py``) take seconds.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import test_gate
from tests.conftest import copy_project, kiln, outputs_copy, project_env
from training import config

MODEL = "kiln-text2image"
SETTINGS = {
    "ingest.num_samples": 300,
    "evaluate.max_prompts": 4,
    "evaluate.sweep_prompts": 0,
    "train_unet.val_samples": 0,  # no held-out loss: no latents needed
}
# `kiln evaluate`, SIGKILLed when the stage calls MODULE.NAME (argv[1], argv[2])
STOPPED = """
import importlib, os, signal, sys
module = importlib.import_module(sys.argv[1])
setattr(module, sys.argv[2], lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL))
from training.cli import main
sys.argv = ["kiln", "evaluate"]
sys.exit(main())
"""


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A project that ``kiln evaluate`` can run in: data ingested and validated, random
    VAE, CLIP and U-Net in data/models, the ControlNet stage's skip note."""
    from tests.test_serving import build_tiny_pipeline
    from training.phases.controlnet import skip_note

    project = copy_project(tmp_path_factory.mktemp("resume") / "kiln")
    config.set_values(project / "params.yaml", SETTINGS)
    kiln(project, "ingest")
    kiln(project, "validate")
    built = tmp_path_factory.mktemp("models")
    build_tiny_pipeline(built)
    for part in ("vae", "clip", "unet"):
        shutil.copytree(built / part, project / "data/models" / part)
    skip_note(project / "data/models/controlnet", "train_controlnet.enabled is false")
    (project / "data/latents").mkdir(parents=True)
    (project / "data/latents/manifest.json").write_text("{}")  # present; not read
    return project


def _client(project: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "module, step, judged",
    [
        ("training.tracking", "promote", False),  # registered, not judged
        ("training.tracking.lineage", "tag_lineage", True),  # judged and crowned, no more
        ("training.tracking.gate", "publish_card", True),  # lineage tagged, no card
    ],
)
def test_an_evaluate_stopped_after_registering_is_finished_by_the_rerun(
    prepared, tmp_path, module, step, judged
):
    """A champion v1 is there, its recorded acc_all -1 and its files elsewhere (it
    cannot be re-scored: the gate uses the record, and the new weights' 0.0 beats it).
    The stopped run registered v2; the re-run takes v2 over: no v3, v2 @champion (judged
    now if the stop came before the gate, else as recorded), with its lineage tags and
    a card that compares it with v1, not with itself."""
    project = outputs_copy(prepared, tmp_path / "kiln")  # without its MLflow store
    client = _client(project)
    client.create_registered_model(MODEL)
    old = client.create_model_version(MODEL, source="file:///nowhere/artifacts")
    client.set_model_version_tag(MODEL, old.version, "metric.acc_all", "-1.0")
    client.set_registered_model_alias(MODEL, "champion", old.version)

    stopped = subprocess.run(
        [sys.executable, "-c", STOPPED, module, step],
        cwd=project, env=project_env(project), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert stopped.returncode == -signal.SIGKILL, stopped.stderr[-3000:]
    new = client.get_model_version(MODEL, "2")  # what the stopped run registered
    assert not new.description  # the stop came before the card
    assert ("gate_decision" in new.tags) == judged
    if judged:  # the stop came after the gate: @champion already, without its card
        assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "2"

    proc = kiln(project, "evaluate")
    assert "finishing it instead of registering them again" in proc.stderr, proc.stderr[-3000:]
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]  # not registered again
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "2"
    v2 = client.get_model_version(MODEL, "2")
    assert (v2.tags["gate_decision"], v2.tags["gate_champion_version"]) == ("champion", "1")
    assert v2.tags["kiln.rows_new"] == "300" and "kiln.data" in v2.tags  # lineage
    card = v2.description
    assert card.startswith(f"# {MODEL} v2\n\n**Gate: @champion.**"), card
    assert "The champion: could not re-score v1" in card, card  # not "champion v2"
    metrics = json.loads((project / "data/metrics/evaluate.json").read_text())
    assert metrics["registered_version"] == "2" and metrics["champion_version"] == 1
    assert v2.tags["kiln.finished_by"] == metrics["mlflow_run_id"]
    card_files = client.list_artifacts(metrics["mlflow_run_id"], "model_card")
    assert "model_card/README.md" in {f.path for f in card_files}


# ---- the gate's side, on a registry alone ----------------------------------------------
registry = test_gate.registry  # a SQLite registry with one model, "m"


def _version(client, acc_all: float, **tags: str) -> str:
    """A version whose evaluation recorded ``acc_all`` (what the gate reads of a champion)."""
    tags = {"metric.acc_all": str(acc_all), **tags}
    return str(client.create_model_version("m", source="file:///nowhere", tags=tags).version)


def _stop_alias_moves(monkeypatch) -> None:
    """The next alias move raises, as a stop right after the decision was recorded."""
    from mlflow import MlflowClient

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", stop)


def test_a_judged_version_is_never_judged_again(registry):
    """v2 lost to v1; when the gate is asked again, with numbers that would now win, it
    returns the recorded decision and crowns nothing."""
    from training.tracking.gate import promote

    first = _version(registry, 0.5)
    promote("m", first, {"acc_all": 0.5}, "acc_all", 0.0)
    loser = _version(registry, 0.4)
    assert promote("m", loser, {"acc_all": 0.4}, "acc_all", 0.0)["gate_decision"] == "challenger"
    again = promote("m", loser, {"acc_all": 0.9}, "acc_all", 0.0)
    assert (again["gate_decision"], again["gate_value"]) == ("challenger", 0.4)
    assert str(registry.get_model_version_by_alias("m", "champion").version) == first


def test_a_winner_stopped_before_its_alias_moved_is_crowned_with_its_components(
    registry, monkeypatch
):
    from training.tracking.gate import promote

    registry.create_registered_model("kiln-vae")
    registry.create_model_version("kiln-vae", source="file:///nowhere")
    first = _version(registry, 0.5)
    promote("m", first, {"acc_all": 0.5}, "acc_all", 0.0)
    winner = _version(registry, 0.7, **{"kiln.component.kiln-vae": "1"})
    with monkeypatch.context() as m:
        _stop_alias_moves(m)
        with pytest.raises(KeyboardInterrupt):
            promote("m", winner, {"acc_all": 0.7}, "acc_all", 0.0)
    assert registry.get_model_version("m", winner).tags["gate_decision"] == "champion"
    assert str(registry.get_model_version_by_alias("m", "champion").version) == first
    promote("m", winner, {"acc_all": 0.1}, "acc_all", 0.0)  # a re-run's worse numbers
    assert str(registry.get_model_version_by_alias("m", "champion").version) == winner
    assert str(registry.get_model_version_by_alias("kiln-vae", "champion").version) == "1"


def test_a_winner_resumed_late_does_not_take_the_champion_from_a_later_one(registry, monkeypatch):
    from training.tracking.gate import promote

    promote("m", _version(registry, 0.5), {"acc_all": 0.5}, "acc_all", 0.0)
    stopped = _version(registry, 0.7)
    with monkeypatch.context() as m:
        _stop_alias_moves(m)
        with pytest.raises(KeyboardInterrupt):
            promote("m", stopped, {"acc_all": 0.7}, "acc_all", 0.0)
    later = _version(registry, 0.8)
    promote("m", later, {"acc_all": 0.8}, "acc_all", 0.0)
    assert promote("m", stopped, {"acc_all": 0.7}, "acc_all", 0.0)["gate_decision"] == "champion"
    assert str(registry.get_model_version_by_alias("m", "champion").version) == later


def test_a_registration_is_unfinished_until_its_finishing_run_ended(registry):
    """``kiln.finished_by`` names the run that published the card; while that run has
    not ended FINISHED (killed after the card), the version is still resumed."""
    from training.tracking import resume

    version = _version(registry, 0.5, **{resume.WEIGHTS_TAG: "abc"})
    assert str(resume.unfinished("m", "abc").version) == version
    assert resume.unfinished("m", "other") is None
    experiment = registry.create_experiment("e")
    for status, found in (("KILLED", version), ("FINISHED", None)):
        run = registry.create_run(experiment).info.run_id
        registry.set_terminated(run, status=status)
        registry.set_model_version_tag("m", version, resume.FINISHED_TAG, run)
        found_now = resume.unfinished("m", "abc")
        assert (found_now and str(found_now.version)) == found


def test_the_weights_fingerprint_is_of_the_tensors_not_the_files(tmp_path: Path):
    from safetensors.numpy import save_file

    from training.tracking.resume import weights_fingerprint

    tensors = {"b": np.ones((2, 3), np.float32), "a": np.arange(4, dtype=np.float32)}
    prints = []
    for i, metadata in enumerate(({"format": "pt"}, {"saved_by": "another version"})):
        (tmp_path / f"{i}/pipeline/unet").mkdir(parents=True)
        save_file(tensors, tmp_path / f"{i}/pipeline/unet/model.safetensors", metadata=metadata)
        prints.append(weights_fingerprint(tmp_path / f"{i}/pipeline"))
    assert prints[0] == prints[1]
    tensors["a"][0] = 7.0
    (tmp_path / "2/pipeline/unet").mkdir(parents=True)
    save_file(tensors, tmp_path / "2/pipeline/unet/model.safetensors")
    assert weights_fingerprint(tmp_path / "2/pipeline") != prints[0]
