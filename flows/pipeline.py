"""The ``kiln-pipeline`` Prefect flow: one task per DVC stage, in order.

DVC decides what is stale (``dvc repro --single-item <stage>`` skips a stage whose
deps, params and outs are unchanged); Prefect decides when and where, retries the
transient failures (ingestion; a crashed training stage resumes from its checkpoint)
and keeps the run history. With no ``PREFECT_API_URL`` set, Prefect runs against its
ephemeral local API — nothing to start.

Where: by default every stage runs in this process (the embedded default). Given a
``gpu_deployment`` (a deployment of the ``kiln-stage`` flow, ``flows/stage.py``, on the
``gpu`` work pool, see prefect.yaml), the GPU stages go there with ``run_deployment``.
The two machines
share nothing but the Prefect API, the MLflow server and the DVC remote: this flow
pushes what it has made, the stage's worker pulls the deps it needs, runs the stage
and pushes its outs, and hands back the stage's ``dvc.lock`` entry and metrics (a
Prefect artifact); this flow merges them and pulls the outs.

All stage runs are nested under one MLflow pipeline run; the flow tags each stage's run
with the DVC hashes of its outputs once DVC has locked them, and publishes a markdown
artifact summarising the metrics.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from collections.abc import Collection

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.stage import run_remote
from flows.tasks import (
    GPU_STAGES,
    ROOT,
    _NoTracebackForStageFailed,
    _set_params,
    refuse_other_project,
    run_local,
)
from training import stages
from training.paths import EVAL, METRICS


def _notify_failure(flow, flow_run, state) -> None:
    """On failure, notify through the Prefect notification block named by
    ``KILN_NOTIFY_BLOCK`` (``slack-webhook/kiln-alerts``, say). Off when unset."""
    name = os.environ.get("KILN_NOTIFY_BLOCK")
    if not name:
        return
    from prefect.blocks.core import Block

    Block.load(name).notify(
        subject=f"Kiln: {flow_run.name} {state.name}",
        body=f"Flow run {flow_run.name} ({flow_run.id}) ended {state.name}: {state.message}",
    )


def _metrics(stage: str) -> dict:
    path = ROOT / METRICS / f"{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _preflight(params) -> None:
    """``evaluate.ruler`` is a CLIP for this profile; in ``mode: scratch`` the models
    the params name to build on exist; in ``mode: continue``, the
    registry answers and the champion fits this profile; and under ``KILN_NPROC=N``
    every training stage's batch splits evenly over N processes; or the run stops here,
    before any stage (``training/evaluation/ruler.py``, ``training/phases/continuing.py``)."""
    uneven = _uneven_batches(params, os.environ.get("KILN_NPROC", "1"))
    if uneven:
        raise PreflightFailed(uneven)
    if params.evaluate.ruler:
        from training.evaluation.ruler import resolve

        try:
            resolve(params)
        except (ValueError, ConnectionError) as exc:  # ReuseError is a ValueError
            raise PreflightFailed(str(exc)) from None
    if params.mode != "continue":
        from training.phases.reuse import check_named

        try:
            check_named(params)
        except (ValueError, ConnectionError) as exc:  # ReuseError is a ValueError
            raise PreflightFailed(str(exc)) from None
        return
    from training.phases.continuing import preflight

    try:
        base = preflight(params)
    except (ValueError, ConnectionError) as exc:  # ReuseError is a ValueError
        raise PreflightFailed(f"mode continue: {exc}") from None
    if base is None:
        print("mode continue: no champion yet, so this run trains from scratch")
    else:
        print("mode continue: building on " + ", ".join(f"models:/{v}" for v in base.values()))


def _uneven_batches(params, nproc: str) -> str:
    """The training stages whose global batch ``nproc`` processes cannot split evenly
    (each process takes an equal slice), as one line; "" when none (was: found at the
    first step of the first training stage, after ingest and validate)."""
    try:  # as the stages' launcher reads it (training/cli/launch.py): 0 or 1, one process
        n = max(1, int(nproc))
    except ValueError:  # was: passed here, and refused by train_vae after ingest, validate
        return f"KILN_NPROC must be a whole number, got {nproc!r}"
    sections = {
        s.name: getattr(params, s.name)
        for s in stages.STAGES
        if s.data_parallel and s.name != "precompute_latents"  # that one splits by shard
    }
    bad = [
        f"{name}.batch_size {c.batch_size}"
        for name, c in sections.items()
        if getattr(c, "enabled", True) and c.batch_size % n  # a ControlNet switched off
    ]
    if not bad:
        return ""
    return (
        f"KILN_NPROC={n}: {', '.join(bad)} do not split evenly over {n} processes; set "
        f"batch sizes that are multiples of {n}, or another KILN_NPROC"
    )


class PreflightFailed(RuntimeError):
    """A continuing run that cannot build on its champion (said before any stage)."""


def summarize(
    params: dict, versions: dict[str, str], new: Collection[str] | None = None
) -> tuple[str, str]:
    """(markdown for Prefect/MLflow, plain text for the terminal). ``new``: the model
    names this run registered a version of (None: all of ``versions``); the others'
    versions were registered by an earlier run for the same outputs (a stage DVC found
    unchanged, weights made again byte for byte), and the summary says so rather than
    list them as this run's."""
    new = set(versions) if new is None else set(new)
    ev = _metrics("evaluate")
    keys = [
        k
        for k in (
            "acc_all",
            "acc_all_seen",
            "acc_all_held_out",
            "acc_shape",
            "acc_colour",
            "acc_size",
            "acc_position",
            "acc_digit",
            "fd_clip_ratio",  # the gate's metric for data without an oracle
            "copies_frac",
            "clip_score",
            "guidance",  # the scale the model was evaluated at and is served at
            "guidance_start",  # ... from this fraction of the steps (0: throughout)
            "vae_psnr",
            "ceiling_acc_all_vae_recon",
            "images_per_s",
        )
        if k in ev
    ]
    md = [
        "# Kiln pipeline",
        "",
        f"dataset **{params['ingest']['dataset']}**, profile **{params['profile']}**",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    md += [f"| {k} | {ev[k]:.3f} |" for k in keys]

    def when(name: str) -> str:
        return "this run" if name in new else "an earlier run (the same outputs)"

    nothing = "no new model version: an earlier run registered every model these outputs make"
    idle = bool(versions) and not new & set(versions)
    md += ["", *([nothing, ""] if idle else [])]
    md += ["| registered model | version | registered by |", "|---|---|---|"]
    md += [f"| {name} | {v} | {when(name)} |" for name, v in versions.items()]
    text = [
        "",
        "Kiln pipeline finished.",
        f"  dataset {params['ingest']['dataset']}, profile {params['profile']}",
        "  registered models (MLflow registry):",
    ]
    width = max((len(f"models:/{n}/{v}") for n, v in versions.items()), default=0)
    text += [f"    {f'models:/{n}/{v}':<{width}}  {when(n)}" for n, v in versions.items()]
    if idle:
        text.append(f"  {nothing}")
    text += ["  evaluation:"] + [f"    {k:<18} {ev[k]:.3f}" for k in keys]
    text += [
        "  report: data/eval/report.html",
        f"  next:   kiln generate {shlex.quote(_example_prompt())} -n 4 --out samples",
    ]
    return "\n".join(md), "\n".join(text)


def _example_prompt() -> str:
    """A prompt from this run's own evaluation set (so from the user's data), for the
    closing hint."""
    try:
        prompts = json.loads((ROOT / EVAL / "prompts.json").read_text())
        return next(p for p in prompts if isinstance(p, str) and p.strip())
    except (OSError, ValueError, StopIteration):
        return "a photo"


@flow(name="kiln-pipeline", log_prints=True, on_failure=[_notify_failure])
def kiln_pipeline(
    profile: str | None = None,
    dataset: str | None = None,
    source: str | None = None,
    gpu_deployment: str | None = None,
    mode: str | None = None,
) -> dict:
    """ingest -> validate -> train_vae -> train_clip -> precompute_latents -> train_unet
    -> train_controlnet (when enabled) -> evaluate, each a DVC stage.

    ``profile``/``dataset``/``source``/``mode`` are written into params.yaml first
    (where DVC tracks them); ``mode: continue`` builds on the registered champion
    (checked before any stage: ``training/phases/continuing.py``).
    ``gpu_deployment``, e.g. ``kiln-stage/gpu``, sends the
    GPU stages to that deployment's work pool."""
    from training import runlock

    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(_NoTracebackForStageFailed())
    refuse_other_project()
    with runlock.pipeline_lock("kiln-pipeline", ROOT):
        return _pipeline(profile, dataset, source, gpu_deployment, mode)


def _trains(stage: str, params) -> bool:
    """Whether ``stage`` trains anything in this run: a switched-off ControlNet stage
    only records its skip, which is not worth a GPU worker's round trip."""
    return stage != "train_controlnet" or params.train_controlnet.enabled


def _pipeline(
    profile: str | None,
    dataset: str | None,
    source: str | None,
    gpu_deployment: str | None,
    mode: str | None,
) -> dict:
    from training import config, tracking

    _set_params(profile, dataset, source, mode)
    gpu_deployment = gpu_deployment or None  # only the parameter: null keeps stages here
    params = config.load(ROOT / "params.yaml")
    _preflight(params)  # before any stage, and before anything is registered
    closed = tracking.close_orphaned_runs(ROOT)
    if closed:
        print(f"marked {len(closed)} MLflow run(s) of dead earlier runs KILLED")
    gate = (params.gate_metric(), params.evaluate.gate_min_delta)
    versions: dict[str, str] = {}
    before = tracking.newest_versions(ROOT)  # a version above these is this run's
    done: list[str] = []
    with tracking.pipeline_run(params.to_dict(), ROOT) as parent:
        for stage in stages.NAMES:
            if gpu_deployment and stage in GPU_STAGES and _trains(stage, params):
                run_remote(stage, gpu_deployment, done, parent)
            else:
                run_local(stage)
            done.append(stage)
            tracking.tag_stage_outputs(parent, stage, ROOT)
            if stage in tracking.REGISTERED_OUTS:
                # a stage DVC restored from its cache registered nothing: do it now
                version = tracking.ensure_registered(
                    parent,
                    stage,
                    ROOT,
                    gate if stage == "evaluate" else None,
                    dict(versions) if stage == "evaluate" else None,  # what it was built from
                )
                if version is not None:
                    versions[tracking.MODEL_NAMES[stage]] = version
        new = {n for n, v in versions.items() if int(v) > before.get(n, 0)}
        name = tracking.MODEL_NAMES["evaluate"]
        champion = tracking.champion_version(name, ROOT)
        if name in versions and champion not in (None, versions[name]):
            # e.g. this data's model was registered earlier and another has won since
            whose = "this run's" if name in new else "these unchanged outputs'"
            print(
                f"note: {whose} {name} is v{versions[name]}; @champion is v{champion} "
                "(the gate promotes only a version that beats it)"
            )
        md, text = summarize(params.to_dict(), versions, new)
        tracking.log_pipeline_summary(_metrics("evaluate"), md)
    create_markdown_artifact(markdown=md, key="kiln-summary", description="Kiln pipeline summary")
    return {"markdown": md, "text": text, "versions": versions, "metrics": _metrics("evaluate")}


if __name__ == "__main__":
    print(kiln_pipeline()["text"])
