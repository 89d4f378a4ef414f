"""MLflow tracking and registry — the only module (with the pyfunc wrapper) importing mlflow.

* One MLflow run per stage, nested under the pipeline run when ``KILN_PARENT_RUN_ID`` is
  set (the Prefect flow sets it). Each run gets the stage's params, per-step metrics,
  the resolved config, the git commit and the DVC hashes of its inputs (from
  ``dvc.lock``) as tags; the flow adds the stage's output hashes once DVC has locked them.
* Embedded default: SQLite at ``<repo>/mlflow.db`` with artifacts in ``<repo>/mlartifacts``;
  ``MLFLOW_TRACKING_URI`` points everything at a server instead.
* Component models (``kiln-vae``, ``kiln-clip``, ``kiln-unet``) are registered as
  directories of safetensors weights + configs; ``kiln-text2image`` is an MLflow pyfunc
  logged as *code* (``training/text2image_model.py``), so loading it unpickles nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EXPERIMENT = "kiln"
PARENT_ENV = "KILN_PARENT_RUN_ID"
MODEL_NAMES = {
    "train_vae": "kiln-vae",
    "train_clip": "kiln-clip",
    "train_unet": "kiln-unet",
    "evaluate": "kiln-text2image",
}


def _quiet() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def tracking_uri(root: Path | None = None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = (root or Path.cwd()).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def setup(root: Path | None = None):
    """Point mlflow at the store and make sure the experiment exists; returns mlflow."""
    _quiet()
    import mlflow

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        location = None
        if uri.startswith("sqlite:"):  # keep artifacts beside the DB, not in the cwd
            location = ((root or Path.cwd()).resolve() / "mlartifacts").as_uri()
        with contextlib.suppress(Exception):  # a concurrent creator may win the race
            mlflow.create_experiment(EXPERIMENT, artifact_location=location)
    mlflow.set_experiment(EXPERIMENT)
    return mlflow


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


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def component_model(name: str, directory: Path):
    """The ``MLmodel`` of a registered component folder: its tensor signature, read from
    the folder's own config, and how to load it. Batch and sequence dims are -1; images
    are float32 in [-1, 1], NCHW. The folders are diffusers/transformers checkpoints,
    not MLflow flavours, so the MLmodel names the loader instead of a flavour."""
    import numpy as np
    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec

    cfg = json.loads((Path(directory) / "config.json").read_text())
    f32, i64 = np.dtype("float32"), np.dtype("int64")
    if name == MODEL_NAMES["train_vae"]:
        size = cfg["sample_size"]
        lat = size // 2 ** (len(cfg["block_out_channels"]) - 1)
        inputs = [TensorSpec(f32, (-1, cfg["in_channels"], size, size), "images")]
        outputs = [TensorSpec(f32, (-1, cfg["latent_channels"], lat, lat), "latent_mean")]
        loader = "diffusers.AutoencoderKL.from_pretrained"
    elif name == MODEL_NAMES["train_clip"]:
        size, text = cfg["vision_config"]["image_size"], cfg["text_config"]["hidden_size"]
        inputs = [
            TensorSpec(i64, (-1, -1), "input_ids"),
            TensorSpec(f32, (-1, 3, size, size), "pixel_values"),
        ]
        outputs = [
            TensorSpec(f32, (-1, -1, text), "text_hidden_states"),
            TensorSpec(f32, (-1, cfg["projection_dim"]), "text_embeds"),
            TensorSpec(f32, (-1, cfg["projection_dim"]), "image_embeds"),
        ]
        loader = "transformers.CLIPModel.from_pretrained (+ CLIPTokenizer)"
    elif name == MODEL_NAMES["train_unet"]:
        size, ch = cfg["sample_size"], cfg["in_channels"]
        inputs = [
            TensorSpec(f32, (-1, ch, size, size), "sample"),
            TensorSpec(i64, (-1,), "timestep"),
            TensorSpec(f32, (-1, -1, cfg["cross_attention_dim"]), "encoder_hidden_states"),
        ]
        outputs = [TensorSpec(f32, (-1, cfg["out_channels"], size, size), "prediction")]
        loader = "diffusers.UNet2DConditionModel.from_pretrained"
    else:
        raise ValueError(f"no component signature for {name!r}")
    return Model(
        signature=ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs)),
        metadata={"load_with": loader, "weights": "safetensors"},
    )


class StageRun:
    """What a phase sees of tracking: metrics and images (``mechanics.MetricLogger``)."""

    def __init__(self, mlflow, run):
        self.mlflow, self.run = mlflow, run

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        self.mlflow.log_metrics(numeric, step=step)

    def log_image(self, path: str | Path, artifact_dir: str = "images") -> None:
        self.mlflow.log_artifact(str(path), artifact_path=artifact_dir)

    def log_artifacts(self, directory: str | Path, artifact_path: str) -> None:
        self.mlflow.log_artifacts(str(directory), artifact_path=artifact_path)

    def register_dir(self, name: str, directory: Path, metrics: dict[str, Any]) -> str:
        """Log a model directory and register it as a new version of ``name``, with an
        ``MLmodel`` beside the weights that carries its tensor signature (so
        ``mlflow.models.get_model_info`` describes what to feed it)."""
        import tempfile

        from mlflow import MlflowClient

        self.log_artifacts(directory, "model")
        with tempfile.TemporaryDirectory() as tmp:
            component_model(name, directory).save(Path(tmp) / "MLmodel")
            self.mlflow.log_artifact(str(Path(tmp) / "MLmodel"), artifact_path="model")
        client = MlflowClient()
        with contextlib.suppress(Exception):
            client.create_registered_model(name)
        source = f"{self.run.info.artifact_uri}/model"
        tags = {k: str(v) for k, v in _flatten({"metric": metrics}).items()}
        tags.update({k: v for k, v in self.run.data.tags.items() if k.startswith(("dvc.", "git"))})
        mv = client.create_model_version(name, source=source, run_id=self.run_id, tags=tags)
        return str(mv.version)

    def register_text2image(self, name: str, pipeline_dir: Path, metrics: dict[str, Any]) -> str:
        """Log the assembled pipeline as a code-defined pyfunc and register it."""
        from mlflow.models import ModelSignature
        from mlflow.types import ColSpec, Schema

        import training

        pkg = Path(training.__file__).parent
        signature = ModelSignature(
            inputs=Schema(
                [
                    ColSpec("string", "prompt"),
                    ColSpec("long", "seed", required=False),
                    ColSpec("long", "steps", required=False),
                    ColSpec("double", "guidance", required=False),
                    ColSpec("string", "negative_prompt", required=False),
                ]
            ),
            outputs=Schema(
                [ColSpec("string", "prompt"), ColSpec("long", "seed"), ColSpec("string", "image")]
            ),
        )
        info = self.mlflow.pyfunc.log_model(
            name="text2image",
            python_model=str(pkg / "text2image_model.py"),
            artifacts={"pipeline": str(pipeline_dir)},
            code_paths=[str(pkg)],
            signature=signature,
            pip_requirements=_requirements(),
            registered_model_name=name,
            metadata={
                "kiln_metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)}
            },
        )
        from mlflow import MlflowClient

        version = str(info.registered_model_version)
        client = MlflowClient()
        for k, v in _flatten({"metric": metrics}).items():
            client.set_model_version_tag(name, version, k, str(v))
        for k, v in self.run.data.tags.items():
            if k.startswith(("dvc.", "git")):
                client.set_model_version_tag(name, version, k, v)
        return version


def promote(
    name: str, version: str, metrics: dict[str, Any], metric: str, min_delta: float
) -> dict:
    """The promotion gate: alias ``champion`` if ``version`` beats the current champion
    on ``metric`` (higher is better) by more than ``min_delta``, else ``challenger``.
    The decision and both numbers are tagged on the version and returned for logging."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    if metric not in metrics or not isinstance(metrics[metric], int | float):
        raise ValueError(
            f"evaluate.gate_metric {metric!r} is not a metric of this run "
            f"(have: {', '.join(k for k, v in metrics.items() if isinstance(v, int | float))})"
        )
    new = float(metrics[metric])
    try:
        champ = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        champ = None
    old = None
    if champ is not None and str(champ.version) != str(version):  # MLflow may give ints
        tag = champ.tags.get(f"metric.{metric}")
        old = float(tag) if tag is not None else None
    promoted = champ is None or old is None or new > old + min_delta
    alias = "champion" if promoted else "challenger"
    client.set_registered_model_alias(name, alias, version)
    decision = {
        "gate_metric": metric,
        "gate_value": new,
        "gate_champion_value": old,
        "gate_champion_version": champ.version if champ is not None else None,
        "gate_decision": alias,
    }
    for k, v in decision.items():
        client.set_model_version_tag(name, version, k, str(v))
    return decision


def _requirements() -> list[str]:
    import importlib.metadata as md

    pins = []
    for dist in (
        "torch",
        "diffusers",
        "transformers",
        "safetensors",
        "pandas",
        "pillow",
        "tokenizers",
        "accelerate",
    ):
        with contextlib.suppress(md.PackageNotFoundError):
            pins.append(f"{dist}=={md.version(dist).split('+')[0]}")
    return pins


def _process_tags() -> dict[str, str]:
    """Who is running this MLflow run: lets a later pipeline tell a run whose process
    died (SIGKILL, a lost machine) from one still going (``close_orphaned_runs``)."""
    import socket

    return {"kiln.host": socket.gethostname(), "kiln.pid": str(os.getpid())}


@contextlib.contextmanager
def _killed_on_interrupt(mlflow) -> Iterator[None]:
    """Ctrl-C ends the active run as KILLED, not FAILED: nothing was wrong with it."""
    try:
        yield
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            mlflow.end_run(status="KILLED")
        raise


def _process_started(pid: int) -> float | None:
    """Start time (epoch seconds) of a live process, None if there is none."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.AccessDenied:  # someone else's live process (hidepid /proc)
        return 0.0
    except psutil.Error:  # NoSuchProcess, ZombieProcess
        return None


def close_orphaned_runs(root: Path | None = None) -> list[str]:
    """Mark KILLED the RUNNING Kiln runs of this host whose process is gone.

    A SIGKILLed pipeline (or a lost stage process) cannot end its own MLflow runs; the
    next pipeline in the same checkout does it, under the run lock. Runs of other hosts
    (a GPU worker, a colleague on a shared server) are left alone: their processes
    cannot be checked from here. A pid reused by a newer process does not count as the
    run's (the process must have started before the run)."""
    import socket

    from mlflow import MlflowClient

    mlflow = setup(root)
    host = socket.gethostname()
    runs = mlflow.search_runs(
        experiment_names=[EXPERIMENT],
        output_format="list",
        filter_string=f"attributes.status = 'RUNNING' and tags.`kiln.host` = '{host}'",
    )
    client, closed = MlflowClient(), []
    for run in runs:
        pid = run.data.tags.get("kiln.pid", "")
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        started = _process_started(int(pid))
        if started is not None and started <= run.info.start_time / 1000 + 1:
            continue  # its process is still alive
        client.set_tag(run.info.run_id, "kiln.closed_by", "next pipeline: its process was gone")
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    return closed


@contextlib.contextmanager
def stage_run(
    stage: str, params_dict: dict[str, Any], resolved_config: Path, root: Path | None = None
) -> Iterator[StageRun]:
    """An MLflow run for one stage, nested under the pipeline run if there is one."""
    mlflow = setup(root)
    parent = os.environ.get(PARENT_ENV) or None
    tags = {
        "kiln.stage": stage,
        "git.commit": git_commit(root),
        **_process_tags(),
        **dvc_lineage(stage, root),
    }
    if parent:
        tags["kiln.pipeline_run_id"] = parent
    start = mlflow.start_run(run_name=stage, nested=bool(parent), parent_run_id=parent, tags=tags)
    with start as run, _killed_on_interrupt(mlflow):
        section = params_dict.get(stage, {})
        flat = {
            "profile": params_dict["profile"],
            "seed": params_dict["seed"],
            **_flatten(section if isinstance(section, dict) else {}),
        }
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
        mlflow.log_artifact(str(resolved_config), artifact_path="config")
        yield StageRun(mlflow, mlflow.get_run(run.info.run_id))


@contextlib.contextmanager
def pipeline_run(params_dict: dict[str, Any], root: Path | None = None) -> Iterator[str]:
    """The parent run of one pipeline execution; yields its id (also exported in env)."""
    mlflow = setup(root)
    tags = {"kiln.stage": "pipeline", "git.commit": git_commit(root), **_process_tags()}
    with mlflow.start_run(run_name="kiln-pipeline", tags=tags) as run, _killed_on_interrupt(mlflow):
        mlflow.log_params(
            {
                "profile": params_dict["profile"],
                "seed": params_dict["seed"],
                "dataset": params_dict["ingest"]["dataset"],
            }
        )
        os.environ[PARENT_ENV] = run.info.run_id
        try:
            yield run.info.run_id
        finally:
            os.environ.pop(PARENT_ENV, None)


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


# The registered model of each stage that makes one, and the DVC out it is made from.
REGISTERED_OUTS = {
    "train_vae": "data/models/vae",
    "train_clip": "data/models/clip",
    "train_unet": "data/models/unet",
    "evaluate": "data/eval",
}


def _locked_md5(stage: str, out: str, root: Path) -> str | None:
    import yaml

    lock_path = root / "dvc.lock"
    if not lock_path.is_file():
        return None
    lock = yaml.safe_load(lock_path.read_text()).get("stages", {}).get(stage, {})
    return next((o.get("md5") for o in lock.get("outs", []) if o["path"] == out), None)


def ensure_registered(
    parent_run_id: str,
    stage: str,
    root: Path,
    gate: tuple[str, float] | None = None,
) -> str | None:
    """The registry version of ``stage``'s model as DVC has it now; registers it if the
    registry lacks it.

    DVC restores a stage from its cache without running it (after ``make clean``, in a
    fresh clone, with a new MLflow server), and then the stage's own registration never
    happens: ``kiln run`` would finish with an empty or partial registry. So after each
    stage the flow asks for the version whose ``dvc.out.<path>`` tag is the locked hash
    of the stage's output: the one this pipeline's stage run just registered (tagged
    here), an earlier one with the same hash, or else a new version registered from the
    restored files under a run tagged ``kiln.restored_from=dvc-cache``. For ``evaluate``
    a new version goes through the gate (``gate`` = (metric, min_delta))."""
    from mlflow import MlflowClient

    out = REGISTERED_OUTS[stage]
    name = MODEL_NAMES[stage]
    md5 = _locked_md5(stage, out, root)
    if md5 is None:
        return None
    mlflow = setup(root)
    client = MlflowClient()
    tag = f"dvc.out.{out}"
    versions = client.search_model_versions(f"name = '{name}'")  # [] for a new name
    runs = mlflow.search_runs(
        experiment_names=[EXPERIMENT],
        output_format="list",
        filter_string=f"tags.`kiln.pipeline_run_id` = '{parent_run_id}' "
        f"and tags.`kiln.stage` = '{stage}'",
    )
    ran = {r.info.run_id for r in runs}
    for v in versions:  # this pipeline's stage run registered it
        if v.run_id in ran:
            client.set_model_version_tag(name, str(v.version), tag, md5)
            return str(v.version)
    for v in sorted(versions, key=lambda v: -int(v.version)):
        if v.tags.get(tag) == md5:
            return str(v.version)
    return _register_restored(parent_run_id, stage, root, md5, gate)


def champion_version(name: str, root: Path | None = None) -> str | None:
    """The version ``@champion`` points at, None when there is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    setup(root)
    try:
        return str(MlflowClient().get_model_version_by_alias(name, "champion").version)
    except MlflowException:
        return None


def _register_restored(
    parent_run_id: str, stage: str, root: Path, md5: str, gate: tuple[str, float] | None
) -> str:
    """Register the files DVC restored for ``stage`` (its run did not happen now)."""
    from mlflow import MlflowClient

    mlflow = setup(root)
    out = root / REGISTERED_OUTS[stage]
    name = MODEL_NAMES[stage]
    metrics_path = root / "data" / "metrics" / f"{stage}.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics = {k: v for k, v in metrics.items() if k not in ("mlflow_run_id", "registered_version")}
    tags = {
        "kiln.stage": stage,
        "kiln.pipeline_run_id": parent_run_id,
        "kiln.restored_from": "dvc-cache",
        f"dvc.out.{REGISTERED_OUTS[stage]}": md5,
        "git.commit": git_commit(root),
        **_process_tags(),
        **dvc_lineage(stage, root),
    }
    with mlflow.start_run(
        run_name=f"{stage} (restored)", nested=True, parent_run_id=parent_run_id, tags=tags
    ) as run:
        tr = StageRun(mlflow, mlflow.get_run(run.info.run_id))
        tr.log_metrics(metrics)
        if stage == "evaluate":
            version = tr.register_text2image(name, out / "pipeline", metrics)
        else:
            version = tr.register_dir(name, out, metrics)
        MlflowClient().set_model_version_tag(name, version, "kiln.restored_from", "dvc-cache")
        if gate is not None:
            metric, min_delta = gate
            if metric in metrics:
                promote(name, version, metrics, metric, min_delta)
    return version


def log_pipeline_summary(summary: dict[str, Any], markdown: str) -> None:
    import mlflow

    mlflow.log_metrics(
        {k: float(v) for k, v in _flatten(summary).items() if isinstance(v, int | float)}
    )
    mlflow.log_text(markdown, "summary.md")


def model_version(uri: str) -> str:
    """``name/version`` a registry URI points at now (``models:/n/latest``, ``models:/n@a``)."""
    from mlflow import MlflowClient

    setup()
    ref = uri.removeprefix("models:/")
    client = MlflowClient()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return f"{name}/{client.get_model_version_by_alias(name, alias).version}"
    name, _, version = ref.partition("/")
    if version in ("", "latest"):
        version = str(max(int(v.version) for v in client.search_model_versions(f"name = '{name}'")))
    return f"{name}/{version}"


def resolve_model_dir(uri: str) -> Path:
    """Local directory of a registered model (``models:/name/version|@alias``)."""
    setup()
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
