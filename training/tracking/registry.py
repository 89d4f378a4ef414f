"""The model registry: each phase's model as a registered version, and the promotion gate.

Component models (``kiln-vae``, ``kiln-clip``, ``kiln-unet``) are registered as
directories of safetensors weights + configs; ``kiln-text2image`` is an MLflow pyfunc
logged as *code* (``training/inference/text2image_model.py``), so loading it unpickles
nothing.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from training.paths import METRICS, SHIPPED_CONTROLNET
from training.stages import MODEL_NAMES, STAGES
from training.tracking.downloads import model_version, resolve_model_dir  # noqa: F401
from training.tracking.gate import COMPONENT_TAG, promote
from training.tracking.lineage import (
    DATA_TAGS,
    data_tags,
    dvc_lineage,
    flatten,
    git_commit,
    locked_md5,
    tag_lineage,
)
from training.tracking.resume import (
    FINISHED_TAG,
    WEIGHTS_TAG,
    folder_fingerprint,
    resume_registration,
    unfinished,
    weights_fingerprint,
)
from training.tracking.runs import StageRun, process_tags
from training.tracking.signatures import RULER_MODEL, component_model  # noqa: F401 (ruler.py)
from training.tracking.store import EXPERIMENT, setup
from training.tracking.twins import SERVED_TAG, served_fingerprint


def _carried(tag: str) -> bool:
    """The run tags a version keeps: DVC lineage, commit, and collection (what ``mode:
    continue`` checks a champion by; a restored version had none: built on unchecked)."""
    return tag.startswith(("dvc.", "git")) or tag in DATA_TAGS


def register_dir(
    tr: StageRun,
    name: str,
    directory: Path,
    metrics: dict[str, Any],
    tags: dict[str, str] | None = None,
) -> str:
    """Log a model directory and register it as a new version of ``name``, with an
    ``MLmodel`` beside the weights that carries its tensor signature (so
    ``mlflow.models.get_model_info`` describes what to feed it); ``tags``: more version
    tags beside the metrics and the lineage. Tagged with its weights' fingerprint, by
    which ``ensure_registered`` finds it whoever ran the stage."""
    import tempfile

    from mlflow import MlflowClient

    tr.log_artifacts(directory, "model")
    with tempfile.TemporaryDirectory() as tmp:
        component_model(name, directory).save(Path(tmp) / "MLmodel")
        tr.mlflow.log_artifact(str(Path(tmp) / "MLmodel"), artifact_path="model")
    client = MlflowClient()
    with contextlib.suppress(Exception):
        client.create_registered_model(name)
    source = f"{tr.run.info.artifact_uri}/model"
    version_tags = {k: str(v) for k, v in flatten({"metric": metrics}).items()}
    version_tags.update({k: v for k, v in tr.run.data.tags.items() if _carried(k)})
    version_tags[WEIGHTS_TAG] = folder_fingerprint(directory)
    version_tags.update(tags or {})
    mv = client.create_model_version(name, source=source, run_id=tr.run_id, tags=version_tags)
    return str(mv.version)


# What the pyfunc model ships and imports: the inference package and the few modules it
# needs, in their package layout (not the training loops, the CLI or the data intake).
SERVING_CODE = (
    "__init__.py",
    "config.py",
    "sections.py",
    "console.py",
    "disk.py",
    "env.py",
    "errors.py",
    "stages.py",
    "tracker.py",
    "paths.py",
    "engine",
    "inference",
    "backbones",
)


def serving_code(dest: Path) -> Path:
    """Copy the serving code into ``dest/training`` and return that folder."""
    import shutil

    import training

    pkg, root = Path(training.__file__).parent, dest / "training"
    root.mkdir(parents=True)
    for name in SERVING_CODE:
        if (pkg / name).is_dir():
            shutil.copytree(pkg / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(pkg / name, root / name)
    return root


def register_text2image(
    tr: StageRun,
    name: str,
    pipeline_dir: Path,
    metrics: dict[str, Any],
    components: dict[str, str] | None = None,
) -> str:
    """Log the assembled pipeline as a code-defined pyfunc and register it, with the
    ControlNet shipped beside it (``controlnet/``, ``inference/control.py``) if any,
    tagged with the ``components`` ({model: version} in this registry) it was built
    from: a promotion crowns those (``gate.crown_components``). The version is created
    with all its tags at once, the weights' fingerprint among them; an earlier version
    of these weights whose registration a stop interrupted is taken over instead of
    registered again (``tracking/resume.py``)."""
    import tempfile

    from training.tracking.signatures import text2image_signature

    tags = {k: str(v) for k, v in flatten({"metric": metrics}).items()}
    tags.update({k: v for k, v in tr.run.data.tags.items() if _carried(k)})
    tags.update({f"{COMPONENT_TAG}{model}": str(v) for model, v in (components or {}).items()})
    tags[WEIGHTS_TAG] = weights_fingerprint(pipeline_dir)
    tags[SERVED_TAG] = served_fingerprint(pipeline_dir)  # what a re-run matches (twins.py)
    pending = unfinished(name, tags[WEIGHTS_TAG])
    if pending is not None:
        return resume_registration(tr, name, pending, tags)
    artifacts = {"pipeline": str(pipeline_dir)}
    shipped = pipeline_dir.parent / SHIPPED_CONTROLNET
    if (shipped / "config.json").is_file():
        artifacts["controlnet"] = str(shipped)
    with tempfile.TemporaryDirectory() as tmp:
        code = serving_code(Path(tmp))
        tr.mlflow.pyfunc.log_model(
            name="text2image",
            python_model=str(code / "inference" / "text2image_model.py"),
            artifacts=artifacts,
            code_paths=[str(code)],
            signature=text2image_signature(),
            pip_requirements=_requirements(),
            metadata={
                "kiln_metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)}
            },
        )
    # as log_model(registered_model_name=...) would, but tagged when it is created
    mv = tr.mlflow.register_model(f"runs:/{tr.run_id}/text2image", name, tags=tags)
    return str(mv.version)


def check_staging_room(folders: list[Path]) -> None:
    """Raise ``DiskFull`` now if the temporary folder (``TMPDIR``) has less room than the
    model ``folders`` take: ``pyfunc.log_model`` copies the whole pipeline there before
    logging it. Asked before evaluate's work: on a small TMPDIR registration failed at
    the very end, as "MlflowException: The following failures occurred while
    downloading one or more artifacts" (the full disk only in MLflow's log), and the
    evaluation it had just made was removed with the stage's outputs."""
    import errno
    import tempfile

    from training.disk import disk_full, free_bytes

    tmp = Path(tempfile.gettempdir())
    files = [f for d in folders if d.is_dir() for f in d.rglob("*") if f.is_file()]
    needed = sum(f.stat().st_size for f in files)
    if free_bytes(tmp) < needed:
        hint = "point TMPDIR at a folder with room (checked before evaluating)"
        raise disk_full("registering the pipeline copies it to", tmp, needed, hint, errno.ENOSPC)


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
        "pydantic",  # the served code reads its sampler defaults from training/config.py
        "PyYAML",
        "opencv-python-headless",  # a control image's Canny edges (inference/control.py)
    ):
        with contextlib.suppress(md.PackageNotFoundError):
            pins.append(f"{dist}=={md.version(dist).split('+')[0]}")
    return pins


# The registered model of each stage that makes one, and the DVC out it is made from.
REGISTERED_OUTS = {s.name: s.outs[0].as_posix() for s in STAGES if s.model}


def ensure_registered(
    parent_run_id: str,
    stage: str,
    root: Path,
    gate: tuple[str, float] | None = None,
    components: dict[str, str] | None = None,
) -> str | None:
    """The registry version of ``stage``'s model as DVC has it now; registers it if the
    registry lacks it.

    DVC restores a stage from its cache without running it (after ``make clean``, in a
    fresh clone, with a new MLflow server), and then the stage's own registration never
    happens: ``kiln run`` would finish with an empty or partial registry. So after each
    stage the flow looks, in this order, for

    1. the version this pipeline's stage run just registered (or finished), then tagged
       ``dvc.out.<path>`` = the locked hash of the stage's output;
    2. an earlier version with that ``dvc.out`` tag;
    3. a version whose ``kiln.weights`` is the fingerprint of the output's weights
       (``resume.weights_fingerprint`` of the pipeline, ``resume.folder_fingerprint`` of
       a component folder), tagged ``dvc.out`` then too;
    4. else a new version registered from the restored files under a run tagged
       ``kiln.restored_from=dvc-cache``.

    Why step 3: only this flow tags ``dvc.out``. A stage run by anyone else (``dvc
    repro``, the ``kiln-stage`` deployment, ``kiln <stage>``) registered its version
    untagged, and the next ``kiln run``, finding every stage up to date, registered the
    same weights again as "restored" (and sent a copy through the gate). The stage
    itself cannot know its DVC hash (DVC writes the lock after it), but it knows its
    weights: their fingerprint is what identifies the output's model. Of several
    versions of the same weights (an evaluation re-run with other settings) the one the
    stage's metrics name (``registered_version``) is taken, else the newest. Weights no
    version carries (a wiped registry, a new server) are a real restore: step 4.
    Versions registered before components carried ``kiln.weights`` are not matched.

    For ``evaluate`` a new version goes through the gate (``gate`` = (metric,
    min_delta)), tagged with the ``components`` this pipeline registered or found (their
    numbers in this registry, not the ones in the restored metrics, which are another
    registry's)."""
    from mlflow import MlflowClient

    out = REGISTERED_OUTS[stage]
    name = MODEL_NAMES[stage]
    md5 = locked_md5(stage, out, root)
    if md5 is None:
        return None
    done = _metrics(root, stage)
    if done.get("skipped"):  # switched off (train_controlnet.enabled): no model to register
        return None
    reused = done.get("reused_version")
    if reused:  # the stage installed a registered version (phases/reuse.py): that one
        return str(reused)
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
    for v in versions:  # this pipeline's stage run registered it, or finished it
        if v.run_id in ran or v.tags.get(FINISHED_TAG) in ran:
            client.set_model_version_tag(name, str(v.version), tag, md5)
            return str(v.version)
    newest_first = sorted(versions, key=lambda v: -int(v.version))
    for v in newest_first:
        if v.tags.get(tag) == md5:
            return str(v.version)
    found = same_weights(newest_first, stage, root, done.get("registered_version"))
    if found is not None:  # registered by the stage run outside this flow
        client.set_model_version_tag(name, found, tag, md5)
        return found
    return _register_restored(parent_run_id, stage, root, md5, gate, components)


def same_weights(versions: list, stage: str, root: Path, named: Any) -> str | None:
    """Which of ``versions`` (newest first) carries the weights of ``stage``'s output:
    the one ``named`` in the stage's metrics if it does, else the newest; None if none,
    or if the last pipeline version of them did not finish its registration (a stop
    before its gate or card): ``_register_restored`` then finishes it, as before."""
    out = root / REGISTERED_OUTS[stage]
    if not any(out.rglob("*.safetensors")):  # no weights to tell apart: a restore
        return None
    if stage == "evaluate":
        fingerprint = weights_fingerprint(out / "pipeline")
        if unfinished(MODEL_NAMES[stage], fingerprint) is not None:
            return None  # registering it resumes that version (resume.py), judged then
    else:
        fingerprint = folder_fingerprint(out)
    same = [str(v.version) for v in versions if v.tags.get(WEIGHTS_TAG) == fingerprint]
    return str(named) if str(named) in same else (same[0] if same else None)


def _metrics(root: Path, stage: str) -> dict:
    path = root / METRICS / f"{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def newest_versions(root: Path | None = None) -> dict[str, int]:
    """{model name: its highest version number now, 0 for none}. Taken before a run, it
    tells the versions that run registered (higher) from those it found already
    registered for unchanged outputs (``ensure_registered``'s steps 2 and 3)."""
    from mlflow import MlflowClient

    setup(root)
    client = MlflowClient()
    return {
        name: max(
            (int(v.version) for v in client.search_model_versions(f"name = '{name}'")), default=0
        )  # fmt: skip
        for name in dict.fromkeys(MODEL_NAMES.values())
    }


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
    parent_run_id: str,
    stage: str,
    root: Path,
    md5: str,
    gate: tuple[str, float] | None,
    components: dict[str, str] | None = None,
) -> str:
    """Register the files DVC restored for ``stage`` (its run did not happen now)."""
    from mlflow import MlflowClient

    from training import config

    params = root / "params.yaml"  # the collection the restored files were made from
    mlflow = setup(root)
    out = root / REGISTERED_OUTS[stage]
    name = MODEL_NAMES[stage]
    metrics = _metrics(root, stage)
    metrics = {k: v for k, v in metrics.items() if k not in ("mlflow_run_id", "registered_version")}
    tags = {
        "kiln.stage": stage,
        "kiln.pipeline_run_id": parent_run_id,
        "kiln.restored_from": "dvc-cache",
        f"dvc.out.{REGISTERED_OUTS[stage]}": md5,
        "git.commit": git_commit(root),
        **process_tags(),
        **dvc_lineage(stage, root),
        **(data_tags(config.load(params).to_dict()) if params.is_file() else {}),
    }
    with mlflow.start_run(
        run_name=f"{stage} (restored)", nested=True, parent_run_id=parent_run_id, tags=tags
    ) as run:
        tr = StageRun(mlflow, mlflow.get_run(run.info.run_id))
        tr.log_metrics(metrics)
        if stage == "evaluate":
            version = register_text2image(tr, name, out / "pipeline", metrics, components)
        else:
            version = register_dir(tr, name, out, metrics)
        MlflowClient().set_model_version_tag(name, version, "kiln.restored_from", "dvc-cache")
        # its data, as a stage-registered version's (was: none, and no card either)
        tag_lineage(tr, name, version, metrics, root)
        decision = None
        if gate is not None:
            metric, min_delta = gate
            # a metric the restored evaluation could not measure still goes through the
            # gate: it wins where there is no champion yet, as when it was measured
            if metric in metrics or f"{metric}_skipped" in metrics:
                decision = promote(name, version, metrics, metric, min_delta)
        if stage == "evaluate" and decision is not None and params.is_file():
            from training.tracking.gate import model_card, publish_card

            card = model_card(
                name, version, metrics | decision, decision, config.load(params).to_dict(), root
            )
            images = [out / "samples.png", out / "champion_samples.png"]
            publish_card(tr, name, version, card, images)  # tags it finished too
        # finished as far as a restore goes: not one to resume
        MlflowClient().set_model_version_tag(name, version, FINISHED_TAG, run.info.run_id)
    return version
