"""The promotion gate on a real MLflow registry (SQLite): higher-is-better metrics and
distances, where lower wins."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from training import config


@pytest.fixture
def registry(tmp_path: Path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")
    yield client


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
    from training.tracking.gate import promote

    got = []
    for value in values:
        version = _version(registry, metric, value)
        gate = promote("m", version, {metric: value}, metric, min_delta=0.02)
        got.append(gate["gate_decision"])
    # the last one beat the champion by 0.05 (> min_delta 0.02) in its direction
    assert got == decisions
    assert gate["gate_direction"] == ("lower" if metric == "fd_clip_ratio" else "higher")
    assert str(registry.get_model_version_by_alias("m", "champion").version) == version


def test_a_metric_the_evaluation_could_not_measure_never_wins_nor_crashes(registry):
    from training.tracking.gate import promote

    why = {"fd_clip_ratio_skipped": "needs >= 2 val images per half"}
    first = promote("m", _version(registry, "x", 0), why, "fd_clip_ratio", 0.0)
    assert first["gate_decision"] == "champion"  # no champion yet: someone must serve
    assert first["gate_skipped"] == why["fd_clip_ratio_skipped"]
    second = promote("m", _version(registry, "x", 0), {"fd_clip_ratio": 1.4}, "fd_clip_ratio", 0)
    assert second["gate_decision"] == "champion"  # the champion has no figure to beat
    third = promote("m", _version(registry, "x", 0), why, "fd_clip_ratio", 0.0)
    assert third["gate_decision"] == "challenger"
    with pytest.raises(ValueError, match="not a metric of this run"):
        promote("m", _version(registry, "x", 0), {"fid": 1.0}, "fd_clip_ratio", 0.0)


def test_the_champion_is_judged_by_its_score_in_this_run_not_its_old_record(registry):
    """The champion's recorded 0.9 was measured under other prompts or code; this run
    re-scored it at 0.6 on the same requests as the challenger's 0.7: the challenger
    wins on the like-for-like numbers, and the decision records both."""
    from training.tracking.gate import promote

    champion = _version(registry, "acc_all", 0.9)
    promote("m", champion, {"acc_all": 0.9}, "acc_all", 0.0)
    same_run = {"acc_all": 0.7, "champion_version": int(champion), "champion.acc_all": 0.6}
    gate = promote("m", _version(registry, "acc_all", 0.7), same_run, "acc_all", 0.0)
    assert gate["gate_decision"] == "champion"
    assert (gate["gate_value"], gate["gate_champion_value"]) == (0.7, 0.6)
    assert gate["gate_champion_source"] == "rescored"
    # a re-score of another version (the champion moved since) is not this champion's
    stale = {"acc_all": 0.65, "champion_version": int(champion), "champion.acc_all": 0.1}
    gate = promote("m", _version(registry, "acc_all", 0.65), stale, "acc_all", 0.0)
    assert gate["gate_champion_source"] == "recorded" and gate["gate_champion_value"] == 0.7
    assert gate["gate_decision"] == "challenger"


def test_user_data_gates_on_the_distance_to_real_images_not_on_clip_score():
    user = config.resolve({"ingest": {"dataset": "folder", "source": "/x"}})
    from training.tracking.gate import GATE_LOWER_IS_BETTER

    assert user.gate_metric() == "fd_clip_ratio" in GATE_LOWER_IS_BETTER
    assert config.resolve({}).gate_metric() == "acc_all"
    # an export of a built-in set (a URL list of shapes) is graded by that set's oracle
    export = config.resolve(
        {"ingest": {"dataset": "url-list", "source": "/x"}, "evaluate": {"oracle": "shapes"}}
    )
    assert (export.oracle(), export.gate_metric()) == ("shapes", "acc_all")
    assert user.oracle() is None


def test_the_model_card_says_what_moved_against_the_champion_and_what_it_was_built_on(
    tmp_path: Path,
):
    import json

    from training.tracking.gate import model_card

    metrics_dir = tmp_path / "data" / "metrics"
    metrics_dir.mkdir(parents=True)
    stages = {
        "ingest": {"rows_new": 403, "rows_kept": 1997, "rows_removed": 0},
        "validate": {"train": 2100.0, "val": 130.0},
        "train_vae": {"registered_version": "1", "reused_from": "models:/kiln-vae@champion"},
        "train_clip": {"registered_version": "1", "reused_from": "models:/kiln-clip@champion"},
        "train_unet": {"registered_version": "2", "init_from": "models:/kiln-unet@champion",
                       "init_version": "1", "finetune_steps": 300},
    }  # fmt: skip
    for stage, m in stages.items():
        (metrics_dir / f"{stage}.json").write_text(json.dumps(m))
    params = config.resolve({"mode": "continue"}).to_dict()
    gate = {"gate_metric": "acc_all", "gate_value": 0.51, "gate_champion_value": 0.44,
            "gate_champion_version": "1", "gate_decision": "champion",
            "gate_champion_source": "rescored"}  # fmt: skip
    metrics = {"acc_all": 0.51, "champion_version": 1, "champion.acc_all": 0.44}
    card = model_card("kiln-text2image", "2", metrics, gate, params, tmp_path)
    assert "**Gate: @champion.**" in card and "(re-scored in this run)" in card
    assert "rows new 403, kept 1997, removed 0" in card
    assert "- VAE v1: reused models:/kiln-vae@champion" in card
    assert "fine-tuned from models:/kiln-unet@champion (v1) for 300 steps" in card
    assert "| acc_all | 0.5100 | 0.4400 | +0.0700 |" in card
    # a champion that could not be re-scored: said, and no made-up comparison
    skipped = {"acc_all": 0.51, "champion_version": 1, "champion_skipped": "could not re-score"}
    card = model_card("kiln-text2image", "2", skipped, gate, params, tmp_path)
    assert "could not re-score (the gate used its recorded number)" in card
    assert "| change |" not in card
    assert "rows removed from the source" not in card  # none were
    # rows taken out of the source (a takedown, say): the card says the parent saw them
    # (was: only "removed 5", as if the new version were free of them)
    (metrics_dir / "ingest.json").write_text(json.dumps({"rows_new": 0, "rows_removed": 5}))
    card = model_card("kiln-text2image", "2", metrics, gate, params, tmp_path)
    assert "Built on models trained with the 5 rows removed from the source since" in card
    assert "a takedown needs `mode: scratch`" in card


def test_a_champion_whose_artifacts_are_gone_is_not_rescored_and_the_run_goes_on(
    registry, monkeypatch
):
    """The registry still names a champion, but its artifact store lost the files (a
    copied project, a wiped bucket). Re-scoring it is impossible; the evaluation must
    say so and let the gate fall back to the recorded number, not crash after sampling."""
    from training.evaluation.evaluate import champion_scores
    from training.evaluation.metrics import Samples
    from training.stages import PIPELINE_MODEL

    registry.create_registered_model(PIPELINE_MODEL)
    lost = registry.create_model_version(PIPELINE_MODEL, source="file:///nowhere/artifacts")
    registry.set_registered_model_alias(PIPELINE_MODEL, "champion", lost.version)
    params = config.resolve({"profile": "tiny"})
    samples = Samples(params, [], [], [], None, Path("."), Path("."), Path("."))
    out = champion_scores(samples, [], batch_size=1)
    assert out["metrics"]["champion_version"] == int(lost.version)
    assert out["metrics"]["champion_skipped"].startswith(f"could not re-score v{lost.version}")
    assert "images" not in out


def test_a_distance_recorded_with_another_ruler_is_not_compared(registry):
    """The champion could not be re-scored in this run, and the number recorded with it
    was measured in another CLIP's space (its own CLIP; this run uses a fixed ruler):
    neither a win nor a loss can be read from it, so the new version waits as
    @challenger and the decision says why."""
    from training.tracking.gate import describe_gate, promote

    first = _version(registry, "fd_clip_ratio", 1.4)
    promote("m", first, {"fd_clip_ratio": 1.4}, "fd_clip_ratio", 0.0)
    ruled = {"fd_clip_ratio": 1.1, "ruler": "models:/kiln-ruler/1"}
    version = _version(registry, "fd_clip_ratio", 1.1)
    gate = promote("m", version, ruled, "fd_clip_ratio", 0.0)
    assert gate["gate_decision"] == "challenger"
    assert gate["gate_champion_source"] == "recorded with another ruler"
    assert (
        "measured with its own CLIP, this one with models:/kiln-ruler/1"
        in (gate["gate_incomparable"])
    )
    assert "-> @challenger" in describe_gate("m", version, gate)
    # a champion recorded with the same ruler is compared as before
    registry.set_model_version_tag("m", first, "metric.ruler", "models:/kiln-ruler/1")
    gate = promote("m", _version(registry, "x", 0), ruled, "fd_clip_ratio", 0.0)
    assert gate["gate_decision"] == "champion" and gate["gate_champion_source"] == "recorded"


def test_a_distance_recorded_before_the_caption_pairing_is_not_compared(registry):
    """Before 2026-12-04 evaluate compared the first samples with the real val half,
    whatever their captions: a champion's number recorded then (no ``fd_pairing``) is
    inflated, and a new version must not win against it by that alone."""
    from training.tracking.gate import promote

    first = _version(registry, "fd_clip_ratio", 1.9)
    promote("m", first, {"fd_clip_ratio": 1.9}, "fd_clip_ratio", 0.0)
    now = {"fd_clip_ratio": 1.2, "fd_pairing": "captions"}
    gate = promote("m", _version(registry, "fd_clip_ratio", 1.2), now, "fd_clip_ratio", 0.0)
    assert gate["gate_decision"] == "challenger"
    assert gate["gate_champion_source"] == "recorded with another pairing"
    assert (
        "compared the first samples with the real val half, this one captions"
        in (gate["gate_incomparable"])
    )
    # recorded with the same pairing: compared as before
    registry.set_model_version_tag("m", first, "metric.fd_pairing", "captions")
    gate = promote("m", _version(registry, "x", 0), now, "fd_clip_ratio", 0.0)
    assert gate["gate_decision"] == "champion" and gate["gate_champion_source"] == "recorded"


def test_components_follow_the_champion_pipeline_however_it_got_there(registry):
    """The bug: only the evaluate stage crowned components, from version numbers in its
    metrics files. A promotion by hand (the playground's button) or a restore from the
    DVC cache moved kiln-text2image@champion and left kiln-vae/clip/unet@champion on
    the old champion's parts (or on none), so `mode: continue` fine-tuned the wrong
    U-Net or stopped. Now the pipeline version names its parts and every promotion
    crowns them."""
    from training.tracking.gate import COMPONENT_TAG, promote
    from training.tracking.versions import promote_by_hand

    parts = ("kiln-vae", "kiln-clip", "kiln-unet")
    for model in parts:
        registry.create_registered_model(model)
        for _ in range(2):
            registry.create_model_version(model, source="file:///nowhere")

    def pipeline(built_from: str, value: float) -> str:
        v = _version(registry, "fd_clip_ratio", value)
        for model in parts:
            registry.set_model_version_tag("m", v, f"{COMPONENT_TAG}{model}", built_from)
        return v

    def champions() -> list[str]:
        return [str(registry.get_model_version_by_alias(m, "champion").version) for m in parts]

    first = pipeline("1", 1.5)
    assert (
        promote("m", first, {"fd_clip_ratio": 1.5}, "fd_clip_ratio", 0.0)["gate_decision"]
        == "champion"
    )
    assert champions() == ["1", "1", "1"]
    second = pipeline("2", 1.8)  # worse: a challenger, and the parts stay
    assert (
        promote("m", second, {"fd_clip_ratio": 1.8}, "fd_clip_ratio", 0.0)["gate_decision"]
        == "challenger"
    )
    assert champions() == ["1", "1", "1"]
    promote_by_hand(second, "preferred by eye", name="m")
    assert champions() == ["2", "2", "2"]
    # the automatic gate's numbers against v1 go; the card says what happened (found in
    # review: they stayed, and the card still read "Gate: @challenger")
    mv = registry.get_model_version("m", second)
    assert mv.tags["gate_source"] == "hand" and "gate_value" not in mv.tags
    assert mv.tags["gate_champion_version"] == first and "gate_metric" not in mv.tags
    assert mv.description.startswith("**Promoted by hand to @champion** ")
    assert mv.description.split("\n")[0].endswith(f"replacing v{first}: preferred by eye.")


def test_a_registry_that_fails_to_answer_is_not_read_as_no_champion(registry, monkeypatch):
    """Were: any MLflow error reading @champion meant "no champion yet", and the gate
    crowned the new version unjudged (here one scoring 0.1 against a 0.9 champion). One
    failed answer injected into the real SQLite registry's client."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from training.tracking.gate import promote

    champion = _version(registry, "acc_all", 0.9)
    promote("m", champion, {"acc_all": 0.9}, "acc_all", 0.0)
    real = MlflowClient.get_model_version_by_alias

    def unavailable(self, name, alias):
        monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", real)  # once
        raise MlflowException("503 Service Unavailable", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", unavailable)
    with pytest.raises(ConnectionError, match="the gate could not read m@champion: 503"):
        promote("m", _version(registry, "acc_all", 0.1), {"acc_all": 0.1}, "acc_all", 0.0)
    assert str(registry.get_model_version_by_alias("m", "champion").version) == champion
    # the retry, the registry back: judged, and not promoted
    late = _version(registry, "acc_all", 0.1)
    assert promote("m", late, {"acc_all": 0.1}, "acc_all", 0.0)["gate_decision"] == "challenger"


def test_a_held_out_gate_metric_with_no_held_out_prompt_evaluated_is_skipped(registry):
    """``evaluate.max_prompts: 12`` keeps only seen shapes prompts; the config accepts
    ``gate_metric: acc_all_held_out``. The accuracy is recorded as skipped with the
    reason, so the gate decides (was: absent, and the gate raised "not a metric of
    this run" after the version was registered, leaving it without an alias)."""
    from training.evaluation.metrics import oracle_accuracy
    from training.evaluation.metrics.base import Samples
    from training.intake import builtin
    from training.tracking.gate import promote

    class Reads:  # the oracle's reading of each sample: every attribute right
        def score(self, img, truth):
            return dict.fromkeys(("all", "shape", "colour", "size", "position"), True)

    params = config.resolve({"evaluate": {"max_prompts": 12, "gate_metric": "acc_all_held_out"}})
    prompts = builtin.eval_prompts("shapes")
    for n, held in ((12, False), (len(prompts), True)):
        assert any(p.held_out for p in prompts[:n]) == held
        s = Samples(params, [None] * n, [p.prompt for p in prompts[:n]], prompts[:n],
                    Reads(), Path(), Path(), Path())  # fmt: skip
        out = oracle_accuracy.score(s)
        assert ("acc_all_held_out" in out) == held
        assert ("acc_all_held_out_skipped" in out) == (not held)
    assert out["acc_all_held_out"] == 1.0
    few = oracle_accuracy.score(
        Samples(params, [None] * 12, [], prompts[:12], Reads(), Path(), Path(), Path())
    )
    assert "no held-out prompt among the 12 samples" in few["acc_shape_held_out_skipped"]
    assert few["acc_all_seen"] == 1.0
    gate = promote("m", _version(registry, "x", 0), few, "acc_all_held_out", 0.0)
    assert gate["gate_decision"] == "champion"  # the first version: someone must serve


@contextlib.contextmanager
def _unet_alias_fails(monkeypatch):
    """The registry fails every kiln-unet alias call inside, and answers again after."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    real = MlflowClient.set_registered_model_alias

    def unet_fails(self, name, alias, version):
        if name == "kiln-unet":
            raise MlflowException("503 from the registry")
        return real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", unet_fails)
    try:
        yield
    finally:
        monkeypatch.setattr(MlflowClient, "set_registered_model_alias", real)


def test_a_promotion_stopped_halfway_is_finished_by_the_next_continuing_run(registry, monkeypatch):
    """The gate moved the pipeline's @champion, then the registry failed while it crowned
    the components: kiln-unet@champion stayed on the old champion's U-Net. Those parts
    agree with each other, so every check of the next continuing run passed and it
    fine-tuned the old U-Net (was: without a word). Its preflight now crowns the
    champion's own parts first."""
    from mlflow.exceptions import MlflowException

    from training.phases import continuing
    from training.tracking.gate import COMPONENT_TAG, components_behind, promote

    parts = ("kiln-clip", "kiln-unet", "kiln-vae")  # crowned in this order
    for model in parts:
        registry.create_registered_model(model)
        for _ in range(2):
            registry.create_model_version(model, source="file:///nowhere")
    versions = []
    for built_from, value in (("1", 1.5), ("2", 1.2)):
        versions.append(_version(registry, "fd_clip_ratio", value))
        for model in parts:
            registry.set_model_version_tag("m", versions[-1], f"{COMPONENT_TAG}{model}", built_from)

    def champions() -> list[str]:
        return [str(registry.get_model_version_by_alias(m, "champion").version) for m in parts]

    promote("m", versions[0], {"fd_clip_ratio": 1.5}, "fd_clip_ratio", 0.0)
    assert champions() == ["1", "1", "1"]
    with _unet_alias_fails(monkeypatch), pytest.raises(MlflowException):
        promote("m", versions[1], {"fd_clip_ratio": 1.2}, "fd_clip_ratio", 0.0)
    assert str(registry.get_model_version_by_alias("m", "champion").version) == versions[1]
    assert champions() == ["2", "1", "1"]
    assert components_behind("m", versions[1]) == {"kiln-unet": ("1", "2"), "kiln-vae": ("1", "2")}
    continuing._components_follow("m", versions[1])
    assert champions() == ["2", "2", "2"]
    assert components_behind("m", versions[1]) == {}


def test_a_promotion_by_hand_that_stopped_halfway_can_be_run_again(registry, monkeypatch):
    """The registry failed while a hand promotion crowned the components: the pipeline
    was @champion without its decision tags, and running it again was refused ("already
    @champion"), leaving the components on the old champion's. Now it finishes."""
    from mlflow.exceptions import MlflowException

    from training.errors import UserError
    from training.tracking.gate import COMPONENT_TAG, promote
    from training.tracking.versions import promote_by_hand

    registry.create_registered_model("kiln-unet")
    for _ in range(2):
        registry.create_model_version("kiln-unet", source="file:///nowhere")
    first, second = (_version(registry, "fd_clip_ratio", v) for v in (1.5, 1.8))
    for v, unet in ((first, "1"), (second, "2")):
        registry.set_model_version_tag("m", v, f"{COMPONENT_TAG}kiln-unet", unet)
    promote("m", first, {"fd_clip_ratio": 1.5}, "fd_clip_ratio", 0.0)
    with _unet_alias_fails(monkeypatch), pytest.raises(MlflowException):
        promote_by_hand(second, "preferred by eye", name="m")

    def unet() -> str:
        return str(registry.get_model_version_by_alias("kiln-unet", "champion").version)

    assert unet() == "1"
    decision = promote_by_hand(second, "preferred by eye", name="m")
    assert unet() == "2" and decision["gate_champion_version"] == first
    assert registry.get_model_version("m", second).tags["gate_source"] == "hand"
    with pytest.raises(UserError, match="already @champion"):  # a finished one still is
        promote_by_hand(second, "again", name="m")


def test_the_champions_copies_are_judged_through_its_own_vae(registry, tmp_path, monkeypatch):
    """The copy check renders training images through a VAE so that a perfect copy is
    at ~0 whatever that VAE's error. The champion's samples were drawn through its own
    VAE, and were judged against this run's renderings (a retrained VAE in scratch
    mode): a champion that copies read far fewer copies than it makes."""
    from tests.test_serving import build_tiny_pipeline
    from training.evaluation import evaluate
    from training.evaluation.metrics import METRICS, Samples
    from training.inference import sampling
    from training.stages import PIPELINE_MODEL

    build_tiny_pipeline(tmp_path / "champ" / "artifacts")
    registry.create_registered_model(PIPELINE_MODEL)
    v = registry.create_model_version(PIPELINE_MODEL, source=f"file://{tmp_path / 'champ'}")
    registry.set_registered_model_alias(PIPELINE_MODEL, "champion", v.version)
    judged: dict = {}

    def memorisation(s):  # what the real check is given, the check itself aside
        judged["vae"] = Path(s.vae_dir)
        return {"copies_frac": 0.0}

    for name in evaluate.SAMPLE_METRICS:
        monkeypatch.setitem(METRICS, name, memorisation if name == "memorisation" else _none)
    params = config.resolve({"profile": "tiny"})
    this_run = tmp_path / "this-run-vae"
    samples = Samples(params, [], [], [], None, Path("."), this_run, Path("."))
    requests = [sampling.Request("a red circle", 0, 2, 1.0)]
    out = evaluate.champion_scores(samples, requests, batch_size=1)
    assert "champion_skipped" not in out["metrics"], out["metrics"]
    assert judged["vae"].parent.name == "pipeline" and judged["vae"].name == "vae"
    assert (judged["vae"] / "config.json").is_file()


def _none(samples) -> dict:
    return {}


def test_a_fine_tune_on_its_parents_very_data_says_so_on_its_card(registry, tmp_path: Path):
    """A continuing run with no new rows (a settings edit re-ran the U-Net) printed the
    last ingestion's counts, "rows new 47 ... since the last ingestion", on a version
    that learnt nothing new: its parent U-Net was trained on the same data/clean."""
    import json

    from training.stages import MODEL_NAMES
    from training.tracking.gate import model_card

    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  validate:\n    outs:\n    - path: data/clean\n"
        "      md5: abc.dir\n"
    )
    metrics_dir = tmp_path / "data" / "metrics"
    metrics_dir.mkdir(parents=True)
    stages = {
        "ingest": {"rows_new": 47, "rows_kept": 108, "rows_removed": 12},
        "train_unet": {"registered_version": "2", "init_from": "models:/kiln-unet@champion",
                       "init_version": "1", "finetune_steps": 60},
    }  # fmt: skip
    for stage, m in stages.items():
        (metrics_dir / f"{stage}.json").write_text(json.dumps(m))
    unet = MODEL_NAMES["train_unet"]
    registry.create_registered_model(unet)
    parent = registry.create_model_version(unet, source="file:///nowhere").version
    registry.set_model_version_tag(unet, parent, "kiln.data", "abc.dir")
    params = config.resolve({"mode": "continue"}).to_dict()
    gate = {"gate_metric": "acc_all", "gate_value": 0.5, "gate_champion_value": None,
            "gate_champion_version": None, "gate_decision": "champion"}  # fmt: skip
    card = model_card("kiln-text2image", "2", {"acc_all": 0.5}, gate, params, tmp_path)
    assert "no new data since its parent U-Net v1: the same rows" in card
    assert "rows new 47" not in card
    # the parent was trained on other data: the ingestion's counts, as before
    registry.set_model_version_tag(unet, parent, "kiln.data", "older.dir")
    card = model_card("kiln-text2image", "2", {"acc_all": 0.5}, gate, params, tmp_path)
    assert "rows new 47, kept 108, removed 12" in card
