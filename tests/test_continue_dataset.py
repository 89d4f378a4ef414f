"""A continuing run builds only on a champion of its own collection, and MLflow records
what each run trained on and with.

- ``mode: continue`` with a champion trained on another dataset (or another source of
  user data) is refused by the preflight before any stage; a collection that grew (a
  folder spelled another way, a shard range with a new upper bound) still continues;
  a champion registered before the collection was tagged is judged by the config its
  run logged, and one that records nothing is built on with a warning.
- The pipeline and stage runs record ``mode``, ``dataset`` and ``source``; a fine-tuning
  ``train_unet`` records the steps and rate it trained with (``trained_steps``,
  ``trained_lr``) beside the section's from-scratch ``steps`` and ``lr``.

The champion is registered through the real code path (``runs.stage_run`` and
``lineage.tag_lineage``) into a real MLflow store (SQLite, in ``tmp_path``).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from tests.conftest import REPO, kiln, py
from tests.test_reuse import trained  # noqa: F401 (the module fixture: VAE and CLIP v1)
from training import config
from training.config import Params
from training.phases import continuing
from training.phases.reuse import ReuseError
from training.stages import PIPELINE_MODEL


@pytest.fixture
def store(tmp_path: Path, monkeypatch) -> Path:
    """An empty MLflow store (SQLite) in ``tmp_path``, the working directory."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    monkeypatch.delenv("KILN_PARENT_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _params(dataset: str = "shapes", source: str | None = None, mode: str = "scratch") -> Params:
    base = config.load(REPO / "params.yaml")
    ingest = base.ingest.model_copy(update={"dataset": dataset, "source": source})
    return base.model_copy(update={"mode": mode, "ingest": ingest})


def _register(root: Path, params: Params, champion: bool = True) -> str:
    """A ``kiln-text2image`` version registered by an evaluate stage run of ``params``
    and tagged as evaluate tags it; made @champion."""
    from mlflow import MlflowClient

    from training.tracking import lineage, runs

    resolved = root / "resolved_params.json"
    resolved.write_text(json.dumps(params.to_dict()))
    with runs.stage_run("evaluate", params.to_dict(), resolved, root) as tr:
        client = MlflowClient()
        with contextlib.suppress(Exception):
            client.create_registered_model(PIPELINE_MODEL)
        mv = client.create_model_version(PIPELINE_MODEL, source="file:///nowhere", run_id=tr.run_id)
        lineage.tag_lineage(tr, PIPELINE_MODEL, str(mv.version), {}, root)
    if champion:
        client.set_registered_model_alias(PIPELINE_MODEL, "champion", mv.version)
    return str(mv.version)


def _same(params: Params, version: str) -> None:
    continuing.same_collection(params, version)  # raises ReuseError for another collection


def _past_the_collection_check(params: Params) -> str:
    """The preflight's error once it got past ``same_collection``: this store has no
    component models, so the first one it fetches is missing."""
    with pytest.raises(ReuseError) as err:
        continuing.preflight(params)
    assert "trained on" not in str(err.value), err.value
    assert "kiln-vae@champion: not in the registry" in str(err.value)
    return str(err.value)


def test_a_champion_of_another_dataset_is_refused_before_any_stage(store: Path):
    version = _register(store, _params("shapes"))
    # the reviewer's case: params.yaml says digits, the deployment continues
    with pytest.raises(ReuseError, match="--mode scratch") as err:
        continuing.preflight(_params("digits", mode="continue"))
    assert str(err.value) == (
        f"the champion ({PIPELINE_MODEL} v{version}) was trained on dataset shapes, this run "
        "is on dataset digits: run --mode scratch (mode: scratch) for a new collection"
    )
    assert "\n" not in str(err.value)
    from mlflow import MlflowClient

    tags = MlflowClient().get_model_version(PIPELINE_MODEL, version).tags
    assert tags["kiln.dataset"] == "shapes" and "kiln.source" not in tags  # tag_lineage
    # user data is another collection too, whatever it holds
    with pytest.raises(ReuseError, match="trained on dataset shapes, this run is on dataset "):
        continuing.preflight(_params("folder", str(store / "pets"), mode="continue"))
    # the same set, more samples (or the held-out pairs): continues
    _past_the_collection_check(_params("shapes", mode="continue"))
    assert continuing.preflight(_params("digits", mode="scratch")) is None  # scratch checks nothing


def test_user_data_continues_while_it_grows_and_is_refused_from_another_source(store: Path):
    (store / "data" / "pets").mkdir(parents=True)
    v1 = _register(store, _params("folder", "data/pets"))
    # the same folder spelled another way (rows it gained are not looked at)
    _same(_params("folder", "./data/pets/", "continue"), v1)
    _same(_params("folder", str(store / "data" / "pets"), "continue"), v1)
    _past_the_collection_check(_params("folder", "data/pets", "continue"))
    with pytest.raises(ReuseError, match="from source data/pets, this run is on dataset "
                       "folder from source data/cats"):  # fmt: skip
        _same(_params("folder", "data/cats", "continue"), v1)
    with pytest.raises(ReuseError, match="this run is on dataset url-list from source"):
        _same(_params("url-list", "data/pets", "continue"), v1)

    # a shard collection that grew its range; another bucket is another collection
    v2 = _register(store, _params("shards", "s3://b/part-{0000..0009}.tar"))
    _same(_params("shards", "s3://b/part-{0000..0019}.tar", "continue"), v2)
    with pytest.raises(ReuseError, match="from source s3://b/part-"):
        _same(_params("shards", "s3://other/part-{0000..0019}.tar", "continue"), v2)
    # a presigned shard URL, signed anew for each run, is the same collection
    signed = "https://h.example/part-{0000..0009}.tar?X-Amz-Date=1&X-Amz-Signature=SIG"
    v3 = _register(store, _params("shards", signed.replace("SIG", "aa")))
    again = signed.replace("SIG", "bb").replace("0009", "0019")
    _same(_params("shards", again, "continue"), v3)


def test_an_older_champion_is_judged_by_its_logged_config_or_continues_with_a_warning(
    store: Path, capsys
):
    from mlflow import MlflowClient

    client = MlflowClient()
    # registered before kiln.dataset existed: its run's config/resolved_params.json says
    old = _register(store, _params("shapes"))
    for tag in ("kiln.dataset", "kiln.source"):
        with contextlib.suppress(Exception):
            client.delete_model_version_tag(PIPELINE_MODEL, old, tag)
    assert "kiln.dataset" not in client.get_model_version(PIPELINE_MODEL, old).tags
    with pytest.raises(
        ReuseError, match="trained on dataset shapes, this run is on dataset digits"
    ):
        continuing.preflight(_params("digits", mode="continue"))
    # no tag and no run: nothing to judge by; allowed, and said
    bare = client.create_model_version(PIPELINE_MODEL, source="file:///nowhere")
    client.set_registered_model_alias(PIPELINE_MODEL, "champion", bare.version)
    capsys.readouterr()
    _past_the_collection_check(_params("digits", mode="continue"))
    said = capsys.readouterr().err
    assert f"{PIPELINE_MODEL} v{bare.version} (@champion) records no dataset" in said


def test_pipeline_and_stage_runs_record_mode_dataset_and_source(store: Path):
    from mlflow import MlflowClient

    from training.tracking import runs

    params = _params("folder", "data/pets", "continue").to_dict()
    resolved = store / "resolved_params.json"
    resolved.write_text(json.dumps(params))
    with runs.pipeline_run(params, store) as parent:
        with runs.stage_run("train_vae", params, resolved, store) as tr:
            child = tr.run_id
        with runs.stage_run("ingest", params, resolved, store) as tr:
            ingest = tr.run_id
    client = MlflowClient()
    want = {"mode": "continue", "dataset": "folder", "source": "data/pets"}
    for run_id in (parent, child, ingest):
        logged = client.get_run(run_id).data.params
        assert {k: logged.get(k) for k in want} == want, (run_id, logged)
    tags = client.get_run(child).data.tags
    assert (tags["kiln.dataset"], tags["kiln.source"]) == ("folder", "data/pets")


def test_a_fine_tuning_unet_logs_the_steps_and_rate_it_trained_with(trained):  # noqa: F811
    """The real ``kiln train-unet``, from scratch and then from the version it made."""
    project = trained
    if not (project / "data" / "latents" / "manifest.json").is_file():
        kiln(project, "precompute-latents")
    small = {"train_unet.batch_size": 8, "train_unet.preview_every": 0,
             "train_unet.val_samples": 0, "train_unet.warmup_steps": 0,
             "train_unet.steps": 3, "train_unet.lr": 0.003, "train_unet.init_from": None,
             "train_unet.finetune_steps": 1, "train_unet.finetune_lr_scale": 0.5}  # fmt: skip
    config.set_values(project / "params.yaml", small)
    kiln(project, "train-unet")
    scratch = json.loads((project / "data" / "metrics" / "train_unet.json").read_text())
    init = f"models:/kiln-unet/{scratch['registered_version']}"
    config.set_values(project / "params.yaml", {"train_unet.init_from": init})
    kiln(project, "train-unet")
    tuned = json.loads((project / "data" / "metrics" / "train_unet.json").read_text())
    code = (
        "import json\nfrom mlflow import MlflowClient\nfrom training import tracking\n"
        "tracking.setup()\nc = MlflowClient()\n"
        f"print(json.dumps([c.get_run(r).data.params for r in "
        f"({scratch['mlflow_run_id']!r}, {tuned['mlflow_run_id']!r})]))"
    )
    first, second = json.loads(py(project, code).strip().splitlines()[-1])
    assert (first["trained_steps"], first["trained_lr"], first["trained_from"]) == (
        "3",
        "0.003",
        "scratch",
    )
    # the section's from-scratch values stay as configured; what it trained with beside
    assert (second["steps"], second["lr"]) == ("3", "0.003")
    assert (second["trained_steps"], second["trained_lr"]) == ("1", "0.0015")
    assert second["trained_from"] == init
    assert (second["mode"], second["dataset"]) == ("scratch", "shapes")


def test_a_signed_source_is_recorded_without_its_signature(store: Path):
    """A presigned source URL carries a credential until it expires: it was logged as
    the runs' `source` param, tagged `kiln.source` on versions and printed on the model
    card, all readable by every account of a shared server. The row keys already drop
    it (``unsigned_url``); what Kiln records does now too."""
    from mlflow import MlflowClient

    from training.intake.canonical import public_params
    from training.tracking.gate import model_card
    from training.tracking.runs import loggable, run_params

    signed = "https://h.example/part-{0000..0009}.tar?X-Amz-Date=1&X-Amz-Signature=SIG"
    params = _params("shards", signed)
    v = _register(store, params)
    client = MlflowClient()
    mv = client.get_model_version(PIPELINE_MODEL, v)
    run = client.get_run(mv.run_id)
    assert mv.tags["kiln.source"] == "https://h.example/part-{0000..0009}.tar"
    assert run.data.params["source"] == "https://h.example/part-{0000..0009}.tar"
    recorded = public_params(params.to_dict())
    assert "SIG" not in json.dumps(recorded) and "SIG" in json.dumps(params.to_dict())
    assert "SIG" not in loggable({"source": signed, **run_params(params.to_dict())})["source"]
    gate = {"gate_decision": "champion", "gate_metric": "fd_clip_ratio", "gate_value": 1.0}
    gate |= {"gate_champion_value": None, "gate_champion_version": None}
    card = model_card(PIPELINE_MODEL, v, {}, gate, params.to_dict(), store)
    assert "X-Amz-Signature" not in card and "h.example/part-" in card
    # a local path or a plain URL is recorded as written
    assert public_params({"ingest": {"source": "./data/pets"}})["ingest"]["source"] == "./data/pets"


def test_scratch_checks_the_models_its_params_name_before_any_stage(store: Path, tmp_path: Path):
    """A misspelled ``train_unet.init_from`` (or a ``reuse`` folder that is not a VAE)
    stops the pipeline in its preflight (was: found by train_unet after ingest,
    validate, the VAE, CLIP and the latents)."""
    from flows.pipeline import PreflightFailed, _preflight

    params = _params()
    _preflight(params)  # nothing named: nothing to check
    unet = params.train_unet.model_copy(update={"init_from": "models:/kiln-unet@champon"})
    with pytest.raises(PreflightFailed, match="kiln-unet@champon"):
        _preflight(params.model_copy(update={"train_unet": unet}))
    (tmp_path / "not_a_vae").mkdir()
    vae = params.train_vae.model_copy(update={"reuse": str(tmp_path / "not_a_vae")})
    with pytest.raises(PreflightFailed, match="not_a_vae: no .* and config.json"):
        _preflight(params.model_copy(update={"train_vae": vae}))
