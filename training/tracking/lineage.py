"""Lineage: the git commit and the DVC hashes that say what a run consumed and made, and
the collection (dataset kind, source) a registered version was trained on."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.intake.canonical import public_source
from training.tracking.store import EXPERIMENT, setup

if TYPE_CHECKING:
    from training.config import Params


def git_commit(root: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def dvc_lineage(stage: str, root: Path | None = None) -> dict[str, str]:
    """``{"dvc.dep.<path>": md5}`` for a stage's data deps, from the outs DVC locked for
    the upstream stages (so the hash is of exactly the data this run consumed)."""
    import yaml

    root = root or Path.cwd()
    try:
        stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
        lock = yaml.safe_load((root / "dvc.lock").read_text()).get("stages", {})
    except (OSError, KeyError, TypeError, AttributeError):
        return {}
    locked = {o["path"]: o.get("md5", "") for s in lock.values() for o in s.get("outs", [])}
    deps = stages.get(stage, {}).get("deps", [])
    return {f"dvc.dep.{d}": locked[d] for d in deps if d in locked}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# The collection a run trains on, as run and version tags. ``kiln.data`` (a hash of the
# clean split) changes with every row a collection gains; these stay while it grows, so
# a continuing run can tell a grown collection from another one (phases/continuing.py).
DATA_TAGS = ("kiln.dataset", "kiln.source")


def data_tags(params_dict: dict[str, Any]) -> dict[str, str]:
    """``kiln.dataset`` (shapes, digits, folder, url-list, shards) and, where one is read,
    ``kiln.source`` (the folder, list or shard spec as params.yaml spells it). A built-in
    set reads none, whatever params.yaml keeps (was: an earlier folder run's source
    tagged a shapes model)."""
    from training.config import BUILTIN_DATASETS

    ingest = params_dict.get("ingest", {})
    tags = {"kiln.dataset": str(ingest.get("dataset"))}
    if ingest.get("source") and ingest.get("dataset") not in BUILTIN_DATASETS:
        tags["kiln.source"] = str(public_source(ingest["source"]))
    return tags


def recorded_data(name: str, version: str) -> dict[str, str | None] | None:
    """``{"dataset": ..., "source": ...}`` a registered version was trained on: its
    ``kiln.dataset``/``kiln.source`` tags; for a version registered before those tags
    existed, the ``ingest`` section of the config its run logged (``runs.stage_run``:
    ``config/resolved_params.json``); None when neither is there."""
    import tempfile

    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    mv = MlflowClient().get_model_version(name, version)
    if mv.tags.get("kiln.dataset"):
        return {"dataset": mv.tags["kiln.dataset"], "source": mv.tags.get("kiln.source")}
    if not mv.run_id:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = download_artifacts(
                run_id=mv.run_id, artifact_path="config/resolved_params.json", dst_path=tmp
            )
            ingest = json.loads(Path(path).read_text())["ingest"]
        except (MlflowException, OSError, ValueError, KeyError, TypeError):
            return None
    if not isinstance(ingest, dict) or not ingest.get("dataset"):
        return None
    return {"dataset": ingest["dataset"], "source": ingest.get("source")}


def other_collection(params: Params, version: str) -> str | None:
    """What ``PIPELINE_MODEL`` version ``version`` was trained on, said as a phrase, if
    that is not this run's collection (``same_collection``'s rule); None when it is the
    same, "" when the version records none."""
    from training.config import BUILTIN_DATASETS
    from training.stages import PIPELINE_MODEL

    ours = (params.ingest.dataset, params.ingest.source)
    recorded = recorded_data(PIPELINE_MODEL, version)
    if recorded is None:
        return ""
    theirs = (str(recorded["dataset"]), recorded.get("source"))
    same = theirs[0] == ours[0] and (
        ours[0] in BUILTIN_DATASETS or _source_key(theirs[1]) == _source_key(ours[1])
    )
    return None if same else collection(*theirs)


def collection(dataset: str, source: str | None) -> str:
    """A collection as messages name it."""
    from training.config import BUILTIN_DATASETS

    if dataset in BUILTIN_DATASETS or not source:
        return f"dataset {dataset}"
    return f"dataset {dataset} from source {source}"


def _source_key(source: str | None) -> str:
    """What identifies a source while it grows: shard ranges' bounds left out, a local
    path resolved, a URL without its signature (signed anew for each run) and its
    trailing slash."""
    key = re.sub(r"\{\d+\.\.\d+\}", "{..}", (source or "").strip())
    if not key or "://" in key:
        return public_source(key).rstrip("/")
    return str(Path(key).expanduser().resolve())


def tag_stage_outputs(parent_run_id: str, stage: str, root: Path | None = None) -> None:
    """After DVC locked a stage, tag its run (if it ran) with the hashes of its outputs."""
    import yaml
    from mlflow import MlflowClient

    mlflow = setup(root)
    lock_path = (root or Path.cwd()) / "dvc.lock"
    if not lock_path.is_file():
        return
    lock = yaml.safe_load(lock_path.read_text()).get("stages", {}).get(stage, {})
    runs = mlflow.search_runs(
        experiment_names=[EXPERIMENT],
        output_format="list",
        max_results=1,
        filter_string=f"tags.`kiln.pipeline_run_id` = '{parent_run_id}' "
        f"and tags.`kiln.stage` = '{stage}'",
    )
    if not runs:
        return
    client = MlflowClient()
    for out in lock.get("outs", []):
        client.set_tag(runs[0].info.run_id, f"dvc.out.{out['path']}", out.get("md5", ""))


def locked_md5(stage: str, out: str, root: Path) -> str | None:
    import yaml

    lock_path = root / "dvc.lock"
    if not lock_path.is_file():
        return None
    lock = yaml.safe_load(lock_path.read_text()).get("stages", {}).get(stage, {})
    return next((o.get("md5") for o in lock.get("outs", []) if o["path"] == out), None)


def tag_lineage(tr, name: str, version: str, metrics: dict, root: Path) -> dict[str, str]:
    """Tag a newly registered version and its run with what it was trained on: the data
    fingerprint (``kiln.data``: data/clean's locked hash), the rows the last ingestion
    added and removed, the collection (``kiln.dataset``, ``kiln.source``: the run's tags,
    ``runs.stage_run``), and for a model started from another (``init_version``) that
    parent and the data the parent was trained on (``kiln.parent_data``)."""
    from mlflow import MlflowClient

    tags = {"kiln.data": locked_md5("validate", "data/clean", root) or "unknown"}
    tags.update({k: v for k, v in tr.run.data.tags.items() if k in DATA_TAGS})
    ingest = root / "data" / "metrics" / "ingest.json"
    counts = json.loads(ingest.read_text()) if ingest.is_file() else {}
    for k in ("rows_new", "rows_kept", "rows_removed"):
        if k in counts:
            tags[f"kiln.{k}"] = str(counts[k])
    client = MlflowClient()
    if metrics.get("init_version"):
        parent = str(metrics["init_version"])
        tags["kiln.parent"] = f"models:/{name}/{parent}"
        tags["kiln.parent_data"] = client.get_model_version(name, parent).tags.get(
            "kiln.data", "unknown"
        )
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    tr.mlflow.set_tags(tags)
    return tags
