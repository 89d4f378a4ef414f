"""Registered versions as people look at them: which pipeline a model name points to,
what each ``kiln-text2image`` version scored and was made from, and moving
``@champion`` by hand (``kiln playground --allow-promote``).

A hand promotion is recorded on the version like the gate's decision (``gate_decision``,
``gate_champion_version``...) with ``gate_source: hand`` and its reason, so the registry
tells an automatic champion from a chosen one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from training.errors import UserError
from training.stages import PIPELINE_MODEL

# version tags shown as lineage (what the version was made from), in this order
LINEAGE_TAGS = (
    "git.commit",
    "kiln.dataset",
    "kiln.source",
    "kiln.data",
    "kiln.parent",
    "kiln.rows_new",
    "kiln.rows_kept",
    "kiln.rows_removed",
    "kiln.restored_from",
)


class UnknownVersion(UserError):
    """A registry reference that names no version (the playground answers 404)."""


def registry_uri(model: str) -> str:
    """``models:/...`` for an alias (``champion``), a version number (``3``), a
    ``name/3`` / ``name@alias`` reference or a URI, of ``kiln-text2image`` by default."""
    if model.startswith("models:/"):
        return model
    if "/" in model or "@" in model:
        return f"models:/{model}"
    if model.isdigit():
        return f"models:/{PIPELINE_MODEL}/{model}"
    return f"models:/{PIPELINE_MODEL}@{model}"


def resolve_version(model: str) -> str:
    """``name/version`` a registry reference points at now; ``UserError`` naming it when
    there is no such version or alias, ``ConnectionError`` when the store does not answer."""
    from training.tracking.registry import model_version
    from training.tracking.store import check_reachable

    if not model.strip():
        raise UserError("no model chosen")
    check_reachable()
    try:
        ref = model_version(registry_uri(model.strip()))
        from mlflow import MlflowClient

        MlflowClient().get_model_version(*ref.split("/", 1))  # an explicit number may not exist
        return ref
    except Exception as exc:
        raise UnknownVersion(f"no registered model {model!r}: {_short(exc)}") from None


def _short(exc: Exception) -> str:
    """MLflow's message without its stack of context lines."""
    text = str(getattr(exc, "message", exc)) or type(exc).__name__
    return text.splitlines()[0][:300]


def pipeline_dir(model: str) -> tuple[Path, str]:
    """(diffusers pipeline directory, version label) of a path, a registry URI or an
    alias / version of ``kiln-text2image``: ``champion``, ``3``, ``models:/name/3``,
    ``models:/name@challenger``. ``UserError`` naming the model when it does not resolve."""
    p = Path(model).expanduser()
    version = str(p.resolve())
    if not p.exists():
        if model.startswith(("/", "./", "../", "~")):
            raise UserError(f"cannot resolve model {model!r}: no such pipeline directory")
        model = registry_uri(model)
        from training.tracking.registry import model_version, resolve_model_dir

        try:
            version = model_version(model)
            p = resolve_model_dir(f"models:/{version}")
        except Exception as exc:
            raise UserError(f"cannot resolve model {model!r}: {exc}") from None
    if (p / "MLmodel").is_file():
        p = p / "artifacts" / "pipeline"
    if not (p / "model_index.json").is_file():
        raise UserError(f"{p} is not a diffusers pipeline directory (no model_index.json)")
    return p, version


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def list_versions(name: str = PIPELINE_MODEL) -> list[dict[str, Any]]:
    """Every version of ``name``, newest first: number, aliases, creation time, metrics
    (its ``metric.*`` tags), the gate's decision and the lineage tags. An empty list when
    the model is not registered yet; ``ConnectionError`` when the store does not answer."""
    from mlflow import MlflowClient

    from training.tracking.store import check_reachable, setup

    check_reachable()
    setup()
    client = MlflowClient()
    aliases: dict[str, list[str]] = {}
    try:
        for alias, v in client.get_registered_model(name).aliases.items():
            aliases.setdefault(str(v), []).append(alias)
    except Exception:  # not registered yet
        return []
    out = []
    for v in client.search_model_versions(f"name = '{name}'"):
        tags = dict(v.tags)
        out.append(
            {
                "version": str(v.version),
                "aliases": sorted(aliases.get(str(v.version), [])),
                "created": int(v.creation_timestamp or 0) // 1000,
                "run_id": v.run_id,
                "metrics": {
                    k.removeprefix("metric."): _number(t)
                    for k, t in sorted(tags.items())
                    if k.startswith("metric.") and t not in ("", "None")
                },
                "gate": {k: t for k, t in sorted(tags.items()) if k.startswith("gate_")},
                "lineage": {k: tags[k] for k in LINEAGE_TAGS if k in tags},
            }
        )
    return sorted(out, key=lambda r: -int(r["version"]))


def promote_by_hand(version: str, reason: str, name: str = PIPELINE_MODEL) -> dict[str, str]:
    """Point ``@champion`` of ``name`` at ``version`` and tag the version with the
    decision (the gate's keys, ``gate_source: hand``, the reason and the time). The old
    champion keeps its tags and becomes ``@challenger`` unless the new champion was it."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from training.tracking.gate import alias_of, crown_components
    from training.tracking.store import check_reachable, setup

    check_reachable()
    setup()
    client = MlflowClient()
    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise UnknownVersion(f"{name} has no version {version!r}") from None
    from training.tracking.store import NOT_FOUND

    try:
        old = str(client.get_model_version_by_alias(name, "champion").version)
    except MlflowException as exc:
        if exc.error_code not in NOT_FOUND:  # not "no champion": the registry failed
            raise ConnectionError(f"could not read {name}@champion: {str(exc)[:300]}") from None
        old = None
    if old == str(version):
        if client.get_model_version(name, version).tags.get("gate_decision"):
            raise UserError(f"{name} v{version} is already @champion")
        # a promotion of it that stopped before its decision was tagged (a registry
        # error while crowning the components): finished, not refused (was: "already
        # @champion", and its components stayed on the old champion's)
        old = alias_of(name, "challenger")
    else:
        client.set_registered_model_alias(name, "champion", version)
        if old is not None:
            client.set_registered_model_alias(name, "challenger", old)
    crown_components(name, version)  # a continuing run builds on the new champion's parts
    decision = {
        "gate_decision": "champion",
        "gate_source": "hand",
        "gate_reason": reason,
        "gate_champion_version": "" if old is None else str(old),  # was "None"
        "gate_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    mv = client.get_model_version(name, version)
    # the automatic gate's numbers were against another champion: they went with its
    # decision (was: kept, beside a gate_champion_version naming the one replaced now)
    for k in STALE_GATE_TAGS:
        if k in mv.tags:
            client.delete_model_version_tag(name, version, k)
    for k, v in decision.items():
        client.set_model_version_tag(name, version, k, v)
    replaced = f", replacing v{old}" if old else ""
    line = f"**Promoted by hand to @champion** {decision['gate_time']}{replaced}: {reason}."
    card = mv.description or ""  # the card's gate line is the automatic decision's
    client.update_model_version(name, version, description=f"{line}\n\n{card}"[:5000])
    return decision


# what gate.promote records that a promotion by hand makes stale
STALE_GATE_TAGS = (
    "gate_metric", "gate_value", "gate_champion_value", "gate_champion_source",
    "gate_direction", "gate_skipped", "gate_incomparable",
)  # fmt: skip
