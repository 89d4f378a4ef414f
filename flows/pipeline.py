"""The ``kiln-pipeline`` Prefect flow: one task per DVC stage, in order.

DVC decides what is stale (``dvc repro --single-item <stage>`` skips a stage whose
deps, params and outs are unchanged); Prefect decides when and where, retries the
transient failures (ingestion) and keeps the run history. With no ``PREFECT_API_URL``
set, Prefect runs against its ephemeral local API — nothing to start.

All stage runs are nested under one MLflow pipeline run; the flow tags each stage's run
with the DVC hashes of its outputs once DVC has locked them, and publishes a markdown
artifact summarising the metrics.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from training.config import STAGES

ROOT = Path.cwd()


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; it already printed its own one-line error."""


class _NoTracebackForStageFailed(logging.Filter):
    """Prefect logs every failed task with its traceback; for a stage that already
    explained itself, that wall of frames hides the one line that matters."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], StageFailed):
            record.exc_info, record.exc_text = None, None
        return True


def _dvc() -> list[str]:
    """The dvc executable beside this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).with_name("dvc")
    return [str(local)] if local.exists() else ["dvc"]


def _run_dvc_stage(stage: str) -> None:
    logger = get_run_logger()
    cmd = [*_dvc(), "repro", "--single-item", stage]
    logger.info("$ %s", " ".join(cmd))
    # The stage commands are `kiln ...`: make sure this interpreter's bin dir (the venv's)
    # is on PATH even when nobody activated the venv (make run). Output goes straight to
    # the terminal so progress bars stay live.
    env = os.environ.copy()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise StageFailed(f"stage {stage} failed (dvc exit code {proc.returncode})")


@task(name="ingest", retries=2, retry_delay_seconds=[5, 30])
def ingest_task() -> None:
    """Ingestion talks to servers: transient failures are retried (img2dataset itself
    resumes completed shards incrementally)."""
    _run_dvc_stage("ingest")


@task(name="stage")
def stage_task(stage: str) -> None:
    _run_dvc_stage(stage)


def _metrics(stage: str) -> dict:
    path = ROOT / "data" / "metrics" / f"{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def summarize(params: dict, versions: dict[str, str]) -> tuple[str, str]:
    """(markdown for Prefect/MLflow, plain text for the terminal)."""
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
            "clip_score",
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
    md += ["", "| registered model | version |", "|---|---|"]
    md += [f"| {name} | {v} |" for name, v in versions.items()]
    text = [
        "",
        "Kiln pipeline finished.",
        f"  dataset {params['ingest']['dataset']}, profile {params['profile']}",
        "  registered models (MLflow registry):",
    ]
    text += [f"    models:/{name}/{v}" for name, v in versions.items()]
    text += ["  evaluation:"] + [f"    {k:<18} {ev[k]:.3f}" for k in keys]
    text += [
        "  report: data/eval/report.html",
        '  next:   kiln generate "a large red circle in the center" -n 4 --out samples',
    ]
    return "\n".join(md), "\n".join(text)


@flow(name="kiln-pipeline", log_prints=True)
def kiln_pipeline() -> dict:
    """ingest -> validate -> train_vae -> train_clip -> precompute_latents -> train_unet
    -> evaluate, each a DVC stage."""
    from training import config, tracking

    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(_NoTracebackForStageFailed())
    params = config.load(ROOT / "params.yaml").to_dict()
    with tracking.pipeline_run(params, ROOT) as parent:
        for stage in STAGES:
            (ingest_task if stage == "ingest" else stage_task.with_options(name=stage))(
                **({} if stage == "ingest" else {"stage": stage})
            )
            tracking.tag_stage_outputs(parent, stage, ROOT)
        versions = tracking.latest_versions(ROOT)
        md, text = summarize(params, versions)
        tracking.log_pipeline_summary(_metrics("evaluate"), md)
    create_markdown_artifact(markdown=md, key="kiln-summary", description="Kiln pipeline summary")
    return {"markdown": md, "text": text, "versions": versions, "metrics": _metrics("evaluate")}


if __name__ == "__main__":
    print(kiln_pipeline()["text"])
