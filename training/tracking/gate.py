"""The promotion gate, and the model card each text-to-image version carries.

A new ``kiln-text2image`` version becomes ``@champion`` only if it beats the current
one on the gate metric, both measured in the same evaluation (``promote``); the card
(``model_card``) says what the version was made from and what moved.
"""

from __future__ import annotations

from typing import Any

from training.intake.canonical import public_source

# Gate metrics where lower is better (distances, losses, copy rates); all others: higher.
GATE_LOWER_IS_BETTER = frozenset({"fd_clip", "cmmd_clip", "fd_clip_ratio", "copies_frac"})
# Measured in a CLIP's image space: the run's own, or evaluate.ruler's (``ruler``)
RULER_METRICS = frozenset({"fd_clip", "cmmd_clip", "fd_clip_ratio"})


# A pipeline version's tag naming a component it was built from: kiln.component.<model>
COMPONENT_TAG = "kiln.component."


def crown_components(name: str, version: str) -> dict[str, str]:
    """Make champions of the components ``name`` v``version`` was built from (its
    ``kiln.component.<model>`` tags, set at registration), so ``models:/kiln-vae@champion``
    is always the champion pipeline's VAE: what a continuing run builds on. Called
    wherever a pipeline's ``@champion`` moves (the gate, a restore, a promotion by
    hand); a version made before the tags existed crowns nothing, and says so."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from training.console import say

    client = MlflowClient()
    parts = _parts(client.get_model_version(name, version).tags)
    if not parts:
        say(f"{name} v{version} names no components: their @champion aliases are unchanged")
    crowned = {}
    for model, v in sorted(parts.items()):
        try:
            client.set_registered_model_alias(model, "champion", v)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            say(f"{model} v{v}, a component of {name} v{version}, is not in this registry")
            continue
        crowned[model] = v
    return crowned


def components_behind(name: str, version: str) -> dict[str, tuple[str | None, str]]:
    """``{model: (its @champion, the version name v``version`` was built from)}`` for each
    component whose alias does not follow the pipeline's champion ``version``: a
    promotion that stopped between moving ``name@champion`` and ``crown_components``
    (a registry error, a kill) left them on the old champion's parts. Those agree with
    each other, so every check of a continuing run passed and it fine-tuned the old
    U-Net while its gate judged against the new champion. Crowning them again
    (``crown_components``) is what the promotion would have done."""
    from mlflow import MlflowClient

    parts = _parts(MlflowClient().get_model_version(name, version).tags)
    return {m: (now, v) for m, v in sorted(parts.items()) if (now := alias_of(m, "champion")) != v}


def _parts(tags: dict[str, str]) -> dict[str, str]:
    """``{model: version}`` from a pipeline version's ``kiln.component.<model>`` tags."""
    n = len(COMPONENT_TAG)
    return {k[n:]: v for k, v in tags.items() if k.startswith(COMPONENT_TAG)}


def promote(
    name: str, version: str, metrics: dict[str, Any], metric: str, min_delta: float
) -> dict:
    """The promotion gate: alias ``champion`` if ``version`` beats the current champion
    on ``metric`` (higher is better, or lower for ``GATE_LOWER_IS_BETTER``) by more than
    ``min_delta``, else ``challenger``. A version whose evaluation could not measure the
    metric (``<metric>_skipped``) wins only where there is no champion yet. The decision
    and both numbers are tagged on the version and returned for logging.

    The champion's number is the one this run's evaluation measured for it
    (``champion.<metric>``: its samples on the same prompts, seeds, sampler and metric
    code, each version at the guidance it is served at, ``evaluation/evaluate.py``) when
    it re-scored this very champion; else the
    number recorded when the champion was registered (``gate_champion_source`` says
    which: a recorded number may have been measured under other prompts or code).

    A version is judged once. The decision is tagged before any alias moves, and a
    version that carries one (a re-run finishing a registration a stop interrupted,
    ``tracking/resume.py``) is not judged again: what the decision left undone is done
    (``_complete``) and the recorded decision returned."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from training.tracking.resume import recorded_decision
    from training.tracking.store import NOT_FOUND

    client = MlflowClient()
    recorded = recorded_decision(client.get_model_version(name, version))
    if recorded is not None:
        _complete(name, str(version), recorded)
        return recorded
    skipped = metrics.get(f"{metric}_skipped")
    if not skipped and not isinstance(metrics.get(metric), int | float):
        raise ValueError(
            f"evaluate.gate_metric {metric!r} is not a metric of this run "
            f"(have: {', '.join(k for k, v in metrics.items() if isinstance(v, int | float))})"
        )
    new = None if skipped else float(metrics[metric])
    try:
        champ = client.get_model_version_by_alias(name, "champion")
    except MlflowException as exc:
        if exc.error_code not in NOT_FOUND:  # was: any error read as "no champion yet",
            raise ConnectionError(  # and the new version was crowned unjudged
                f"the gate could not read {name}@champion: {str(exc)[:300]}"
            ) from None
        champ = None
    old, source, incomparable = None, None, None
    if champ is not None and str(champ.version) != str(version):  # MLflow may give ints
        rescored = metrics.get(f"champion.{metric}")
        if str(metrics.get("champion_version")) == str(champ.version) and isinstance(
            rescored, int | float
        ):
            old, source = float(rescored), "rescored"
        else:
            tag = champ.tags.get(f"metric.{metric}")
            old = float(tag) if tag not in (None, "None") else None
            source = "recorded" if old is not None else None
            theirs, ours = champ.tags.get("metric.ruler"), metrics.get("ruler")
            paired = champ.tags.get("metric.fd_pairing"), metrics.get("fd_pairing")
            if old is not None and metric in RULER_METRICS and theirs != ours:
                # another ruler's number: not comparable, and not "no number" either
                source = "recorded with another ruler"
                incomparable = (
                    f"the champion v{champ.version} could not be re-scored, and its recorded "
                    f"{metric} was measured with {theirs or 'its own CLIP'}, this one with "
                    f"{ours or 'its own CLIP'}: promote by hand if it should serve"
                )
            elif old is not None and metric in RULER_METRICS and paired[0] != paired[1]:
                # before 2026-12-04 the first samples were compared, whatever their
                # captions (metrics/distribution.py, ``paired``): a number inflated by that
                source = "recorded with another pairing"
                incomparable = (
                    f"the champion v{champ.version} could not be re-scored, and its recorded "
                    f"{metric} compared {paired[0] or 'the first samples'} with the real val "
                    f"half, this one {paired[1] or 'the first samples'}: promote by hand if "
                    "it should serve"
                )
    lower = metric in GATE_LOWER_IS_BETTER
    if incomparable and new is not None:  # measured, but nothing to compare it with
        promoted = False
    elif new is None:
        promoted = champ is None
    elif old is None:
        promoted = True
    else:
        promoted = new < old - min_delta if lower else new > old + min_delta
    alias = "champion" if promoted else "challenger"
    decision = {
        "gate_metric": metric,
        "gate_value": new,
        "gate_champion_value": old,
        "gate_champion_version": champ.version if champ is not None else None,
        # rescored (in this run) | recorded | recorded with another ruler | recorded
        # with another pairing | None
        "gate_champion_source": source,
        "gate_decision": alias,
        "gate_direction": "lower" if lower else "higher",
    }
    if skipped:
        decision["gate_skipped"] = skipped
    if incomparable:
        decision["gate_incomparable"] = incomparable
    # gate_decision last: a version with it has its whole decision recorded
    for k, v in sorted(decision.items(), key=lambda kv: kv[0] == "gate_decision"):
        client.set_model_version_tag(name, version, k, str(v))
    client.set_registered_model_alias(name, alias, version)
    if promoted:
        crown_components(name, version)
    return decision


def alias_of(name: str, alias: str) -> str | None:
    """The version ``name@alias`` points at, None when there is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from training.tracking.store import NOT_FOUND

    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code not in NOT_FOUND:
            raise ConnectionError(f"could not read {name}@{alias}: {str(exc)[:300]}") from None
        return None


def _complete(name: str, version: str, decision: dict) -> None:
    """Do what a stop may have left undone after the gate recorded ``decision`` on
    ``version``, and nothing that would undo what happened since: a winner takes
    ``@champion`` only from the version it beat (or where there was none), then crowns
    its components; a loser takes ``@challenger`` unless a newer version holds it. A
    loser is never crowned."""
    from mlflow import MlflowClient

    from training.console import say

    client = MlflowClient()
    alias = decision["gate_decision"]
    now = alias_of(name, alias)
    if alias == "champion":
        if now not in (version, decision.get("gate_champion_version")):
            say(f"{name}@champion is v{now} since v{version} won the gate: left there")
            return
        if now != version:
            client.set_registered_model_alias(name, "champion", version)
        crown_components(name, version)
    elif now is None or int(now) < int(version):
        client.set_registered_model_alias(name, alias, version)
    say(f"{name} v{version} keeps the gate's recorded decision: @{alias}")


def describe_gate(name: str, version: str, gate: dict) -> str:
    """One line for the console: the new version's score against the champion's."""
    if gate.get("gate_source") == "hand":  # versions.promote_by_hand
        return f"{name} v{version} was promoted by hand ({gate.get('gate_reason')}) -> @champion"
    if gate.get("gate_skipped"):
        return (
            f"{name} v{version}: {gate['gate_metric']} was not measured "
            f"({gate['gate_skipped']}) -> @{gate['gate_decision']}"
        )
    if gate.get("gate_incomparable"):
        return (
            f"{name} v{version} {gate['gate_metric']}={gate['gate_value']:.4f}; "
            f"{gate['gate_incomparable']} -> @{gate['gate_decision']}"
        )
    old = gate["gate_champion_value"]
    how = " (re-scored in this run)" if gate.get("gate_champion_source") == "rescored" else ""
    vs = (
        "no champion yet"
        if old is None
        else f"champion v{gate['gate_champion_version']} has {old:.4f}{how}"
    )
    return (
        f"{name} v{version} {gate['gate_metric']}={gate['gate_value']:.4f}, {vs} "
        f"-> @{gate['gate_decision']}"
    )


# metrics the card compares, where this run has them (the gate's first)
CARD_METRICS = (
    "acc_all",
    "acc_all_seen",
    "acc_all_held_out",
    "clip_score",
    "fd_clip",
    "fd_clip_ratio",
    "cmmd_clip",
    "copies_frac",
)


def _read(root, name: str) -> dict:
    import json

    path = root / "data" / "metrics" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _data_of(unet_version) -> str | None:
    """The ``kiln.data`` a U-Net version was trained on (None where unknown)."""
    from mlflow import MlflowClient

    from training.stages import MODEL_NAMES

    try:
        mv = MlflowClient().get_model_version(MODEL_NAMES["train_unet"], str(unet_version))
    except Exception:  # noqa: BLE001 (a card line, not worth failing a registration)
        return None
    return mv.tags.get("kiln.data")


def model_card(name: str, version: str, metrics: dict, gate: dict, params: dict, root) -> str:
    """The version's model card (markdown): the decision with both numbers, what data,
    what it was built on (reused components, the parent U-Net), which metrics moved
    against the champion re-scored in the same run, and where its samples are."""
    ingest, validate = _read(root, "ingest"), _read(root, "validate")
    vae, clip, unet = _read(root, "train_vae"), _read(root, "train_clip"), _read(root, "train_unet")
    from training.tracking.lineage import locked_md5

    data, clean = params["ingest"], locked_md5("validate", "data/clean", root)
    lines = [
        f"# {name} v{version}",
        "",
        f"**Gate: @{gate['gate_decision']}.** {describe_gate(name, version, gate)}.",
        "",
        "## Data",
        f"- dataset `{data['dataset']}`"
        + (f", source `{public_source(data['source'])}`" if data["source"] else ""),
        f"- {_fmt(validate.get('train', '?'))} train / {_fmt(validate.get('val', '?'))} val "
        f"samples (data/clean {clean or 'not locked'})",
    ]
    if clean and unet.get("init_version") and _data_of(unet["init_version"]) == clean:
        # was: the last ingestion's counts, as if this version had new rows to learn
        lines.append(f"- no new data since its parent U-Net v{unet['init_version']}: the same rows")
    elif "rows_new" in ingest:
        lines.append(
            f"- rows new {ingest['rows_new']}, kept {ingest.get('rows_kept', 0)}, "
            f"removed {ingest.get('rows_removed', 0)} since the last ingestion"
        )
    lines += ["", f"## Built on (mode `{params.get('mode', 'scratch')}`)"]
    for what, m in (("VAE", vae), ("CLIP", clip)):
        how = f"reused {m['reused_from']}" if m.get("reused_from") else "trained on this data"
        lines.append(f"- {what} v{m.get('registered_version', '?')}: {how}")
    if unet.get("init_from"):
        lines.append(
            f"- U-Net v{unet.get('registered_version', '?')}: fine-tuned from {unet['init_from']}"
            f" (v{unet.get('init_version', '?')}) for {unet.get('finetune_steps', '?')} steps"
        )
    else:
        lines.append(f"- U-Net v{unet.get('registered_version', '?')}: trained from scratch")
    removed = ingest.get("rows_removed", 0)
    if removed and any(m.get("init_from") or m.get("reused_from") for m in (vae, clip, unet)):
        lines.append(
            f"- **Built on models trained with the {removed} rows removed from the source "
            "since**: fine-tuning and reuse do not forget them (a takedown needs `mode: "
            "scratch`)"
        )
    champ = metrics.get("champion_version")
    lines += ["", "## Metrics"]
    if metrics.get("champion_skipped"):
        used = (
            "the gate did not compare" if gate.get("gate_incomparable")
            else "the gate used its recorded number"
        )  # fmt: skip
        lines += [f"The champion: {metrics['champion_skipped']} ({used}).", ""]
    if champ is not None and not metrics.get("champion_skipped"):
        lines += [
            f"The champion v{champ} re-scored in this run: same prompts, seeds and sampler.",
            "",
            f"| metric | v{version} | champion v{champ} | change |",
            "|---|---|---|---|",
        ]
        for k in CARD_METRICS:
            new, old = metrics.get(k), metrics.get(f"champion.{k}")
            if isinstance(new, int | float) and isinstance(old, int | float):
                lines.append(f"| {k} | {new:.4f} | {old:.4f} | {new - old:+.4f} |")
    else:
        lines += [f"| metric | v{version} |", "|---|---|"]
        lines += [f"| {k} | {metrics[k]:.4f} |" for k in CARD_METRICS if k in metrics]
    lines += [
        "",
        "## Samples",
        "![samples](samples.png) (this version; `champion_samples.png`: the champion on the "
        "same prompts and seeds), beside this card in the run's `model_card/` artifacts",
    ]
    return "\n".join(lines) + "\n"


def publish_card(tr, name: str, version: str, card: str, images: list) -> None:
    """The card as the version's description (MLflow keeps 5,000 characters) and as an
    artifact, ``model_card/README.md``, with the sample grids it shows beside it, in
    this stage run. The card is the registration's last step: the version is then
    tagged with the run (``resume.FINISHED_TAG``), and once that run has ended a re-run
    of evaluate no longer finishes this version but registers its own."""
    import tempfile
    from pathlib import Path

    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "README.md").write_text(card)
        tr.mlflow.log_artifact(str(Path(tmp) / "README.md"), artifact_path="model_card")
    for image in images:
        if Path(image).is_file():
            tr.mlflow.log_artifact(str(image), artifact_path="model_card")
    from training.tracking.resume import FINISHED_TAG

    client = MlflowClient()
    client.update_model_version(name, version, description=card[:5000])
    client.set_model_version_tag(name, version, FINISHED_TAG, tr.run_id)
