"""The stage commands (what ``dvc.yaml`` runs), one thin adapter each: load the typed
config, check inputs, open the MLflow run, call the phase's ``run()``, register what it
made. The stage's partial outputs are removed on failure, so nothing half-written looks
valid; a run refused by the input checks (``require``, the phase's ``check_inputs``)
never clears them, so the last good output stays as it was.

This module imports only what a stage needs: ``kiln ingest`` and ``kiln validate`` never
load torch, and an edit to a user command (``training/cli/user.py``) re-runs no stage.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from training import paths as P
from training.cli.base import (
    UserError,
    cleanup,
    fail,
    failure_note,
    load_params,
    prefixed,
    raw_params,
    record_failure,
    require,
    transient,
    writable,
)
from training.env import offline_defaults
from training.stages import BY_NAME, PIPELINE_MODEL, SOURCE_PROBE, STAGES

offline_defaults()

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


def run_stage(
    stage: str,
    body: Callable[..., dict],
    register: Callable | None = None,
    check: Callable | None = None,
) -> dict:
    """The shared adapter: config -> checks -> MLflow run -> phase -> metrics/registry.
    ``body(params, tracker)`` runs the phase; ``register(tracker, metrics)`` registers
    what it made and returns the version; ``check(params)`` refuses stale or mismatched
    inputs before the outs are cleared."""
    from training import runlock
    from training.cli import launch

    spec = BY_NAME[stage]
    if spec.data_parallel and launch.relaunch_under_torchrun(stage):
        return {}
    if spec.data_parallel and launch.is_follower():
        return launch.follow(stage, body)
    with contextlib.ExitStack() as held:
        try:  # before anything is touched: the running pipeline owns data/
            held.enter_context(runlock.stage_lock(stage))
        except runlock.PipelineBusy as exc:
            fail(str(exc))
        return _run_stage(stage, spec, body, register, check)


def _stash_previews(stage: str, spec) -> None:
    """A training stage's previews, kept beside its checkpoints while its outs are
    emptied (a re-run, or a failure): a resumed run draws only the steps after its
    checkpoint, and the earlier ones were lost (found in review: an interrupted and
    resumed U-Net's ``previews/``, and so its DVC out, differed from an uninterrupted
    one's). Without a checkpoint to resume, an old stash is dropped."""
    if not spec.checkpoints:
        return
    stash, previews = P.CKPT / stage / "previews", Path(spec.outs[0]) / "previews"
    if not any((P.CKPT / stage).glob("step-*/COMPLETE")):
        shutil.rmtree(stash, ignore_errors=True)
        return
    if previews.is_dir():
        stash.mkdir(parents=True, exist_ok=True)
        for f in previews.glob("step-*.png"):
            shutil.copy2(f, stash / f.name)


def _restore_previews(stage: str, out: Path, resumed: int) -> None:
    """The stashed previews of the steps a run resumed at ``resumed`` did not draw."""
    stash = P.CKPT / stage / "previews"
    if not resumed or not stash.is_dir() or not (out / "previews").is_dir():
        return
    for f in stash.glob("step-*.png"):
        if int(f.stem.split("-")[1]) <= resumed and not (out / "previews" / f.name).exists():
            shutil.copy2(f, out / "previews" / f.name)


def _run_stage(
    stage: str, spec, body: Callable[..., dict], register: Callable | None, check=None
) -> dict:
    """``run_stage``'s work, under the stage's hold on the run lock."""
    from training import config, tracking
    from training.cli.base import Terminated, terminate_like_interrupt
    from training.disk import disk_full_errors, write_json
    from training.errors import TrainingDiverged
    from training.intake.canonical import public_params

    outs, inputs = list(spec.outs), list(spec.inputs)
    fresh = [] if spec.persist else outs  # what starts empty (and is removed on failure)
    t0 = time.perf_counter()
    failure_note(stage).unlink(missing_ok=True)
    terminate_like_interrupt()

    cleared: list[bool] = []

    def empty_outs() -> None:  # as DVC does before a run; a resume keeps its previews
        cleared.append(True)
        _stash_previews(stage, spec)
        cleanup(fresh)

    def undo() -> None:
        # a failed run's half-written outs go; a run refused before they were cleared
        # leaves the last good ones (was: `kiln train-unet` refusing latents of another
        # VAE deleted data/models/unet, and `kiln generate` had no U-Net)
        if cleared:
            empty_outs()

    try:
        params = load_params()
        # streamed inputs live in object storage when KILN_DATA_REMOTE is set: the
        # loaders check the remote index before training instead
        remote = os.environ.get("KILN_DATA_REMOTE", "").strip()
        require(*[p for p in inputs if not (remote and p in spec.streamed)])
        writable(*outs, P.METRICS)
        if spec.model == PIPELINE_MODEL:  # MLflow stages the pipeline in TMPDIR
            tracking.registry.check_staging_room([P.VAE, P.CLIP, P.UNET, P.CONTROLNET])
        if check is not None:  # the phase's own input checks, while the outs are whole
            check(params)
        empty_outs()  # DVC removes outs before a run (but persist ones); do the same
        # every run records its config beside its outputs (for its MLflow run); a persist
        # stage's only once it finished: a refused run leaves the old output's bytes
        keep = P.STATE / "resolved" / stage if spec.persist else outs[0]
        resolved = keep / "resolved_params.json"
        recorded = public_params(params.to_dict())  # a signed source without its signature
        write_json(resolved, recorded)
        with tracking.stage_run(stage, recorded, resolved) as tr:
            with disk_full_errors(f"{stage} output", outs[0]):
                metrics = body(params, tr)
                if spec.persist and spec.records_config:
                    shutil.copy2(resolved, outs[0] / resolved.name)
                _restore_previews(stage, outs[0], metrics.get("resumed_from_step", 0))
            if metrics.get("skipped"):
                # a stage switched off (train_controlnet) made nothing from this config:
                # kept in its DVC out, every edit of its params changed the out's hash
                # and re-ran evaluate on unchanged weights (a duplicate version); the
                # config stays on the MLflow run
                resolved.unlink(missing_ok=True)
            metrics["stage_seconds"] = time.perf_counter() - t0
            tr.log_metrics(metrics)
            if register is not None:
                metrics["registered_version"] = register(tr, metrics)
            metrics["mlflow_run_id"] = tr.run_id
        write_json(P.METRICS / f"{stage}.json", metrics)
        if spec.checkpoints:
            # Resume state is for an interrupted run only. Kept, a finished stage's last
            # checkpoint would be "resumed" by the next run of the stage (DVC re-runs it
            # when its code changes, which the checkpoint's fingerprint cannot see), which
            # would train nothing and register the old weights as new.
            shutil.rmtree(P.CKPT / stage, ignore_errors=True)
        return metrics
    except (config.ConfigError, UserError, TrainingDiverged) as exc:
        undo()
        record_failure(stage, str(exc), retry=False)
        fail(str(exc))
    except (OSError, ValueError, RuntimeError) as exc:
        undo()
        record_failure(stage, prefixed(stage, str(exc)), retry=transient(exc))
        if os.environ.get("KILN_DEBUG"):
            raise
        fail(prefixed(stage, str(exc)))
    except Exception as exc:  # none of the above: a library's own error class, or a bug
        # was: a traceback, no note (so the flow retried it) and half an output left
        undo()
        message = prefixed(stage, f"{type(exc).__name__}: {exc}".splitlines()[0])
        record_failure(stage, message, retry=False)
        if os.environ.get("KILN_DEBUG"):
            raise
        fail(f"{message} (KILN_DEBUG=1 shows where)")
    except KeyboardInterrupt as exc:
        undo()
        # SIGTERM (an evicted pod, a scheduler's stop) is worth a retry, which resumes;
        # never in place of another rank's reason (torchrun terminates the rest)
        terminated = isinstance(exc, Terminated)
        said = "terminated (SIGTERM)" if terminated else "interrupted"
        if not (terminated and failure_note(stage).exists()):
            record_failure(stage, said, retry=terminated)
        typer.echo(
            f"kiln: {stage}: {said} (re-run it: training resumes from its last "
            "checkpoint, ingest keeps its finished shards)",
            err=True,
        )
        raise typer.Exit(130) from None
    return {}


def _register(stage: str) -> Callable | None:
    """How a stage's output becomes a registry version: a component folder, or the
    text-to-image pipeline, which then goes through the promotion gate."""
    spec = BY_NAME[stage]
    if spec.model is None:
        return None
    from training import tracking

    if spec.model != PIPELINE_MODEL:

        def register_component(tr, metrics: dict) -> str | None:
            if metrics.get("skipped"):  # a stage switched off (train_controlnet) makes none
                tr.mlflow.set_tag("kiln.skipped", metrics["skipped"])
                return None
            if metrics.get("reused_version"):  # a registry version, installed as it was
                tr.mlflow.set_tag("kiln.reused_from", metrics["reused_from"])
                return str(metrics["reused_version"])
            twin = tracking.twins.component_twin(tr, spec.model, spec.outs[0])
            if twin is not None:  # the same weights: that version (tracking/twins.py)
                return twin
            version = tracking.register_dir(tr, spec.model, spec.outs[0], metrics)
            tracking.lineage.tag_lineage(tr, spec.model, version, metrics, Path.cwd())
            return version

        return register_component

    def register_pipeline(tr, metrics: dict) -> str:
        for name in ("report.html", "samples.png"):  # the pipeline is logged with the model
            tr.log_image(P.EVAL / name, "evaluation")
        twin = tracking.twins.pipeline_twin(tr, spec.model, P.EVAL / "pipeline", metrics)
        if twin is not None:  # served as that version: its recorded decision stands
            return twin
        version = tracking.register_text2image(
            tr, spec.model, P.EVAL / "pipeline", metrics, tracking.components.built_from()
        )
        params = load_params()
        gate = tracking.promote(
            spec.model, version, metrics, params.gate_metric(), params.evaluate.gate_min_delta
        )
        tr.log_metrics({k: v for k, v in gate.items() if isinstance(v, float)})
        tr.mlflow.set_tag("gate_decision", gate["gate_decision"])
        metrics.update(gate)
        gate_line = tracking.describe_gate(spec.model, version, gate)
        typer.echo(f"[kiln] {stage}: gate: {gate_line}", err=True)
        _other_collection_warning(params, gate.get("gate_champion_version"))
        tracking.lineage.tag_lineage(tr, spec.model, version, metrics, Path.cwd())
        card = tracking.gate.model_card(
            spec.model, version, metrics, gate, params.to_dict(), Path.cwd()
        )
        tracking.gate.publish_card(
            tr, spec.model, version, card, [P.EVAL / "samples.png", P.EVAL / "champion_samples.png"]
        )
        return version  # a promotion crowned its components (gate.crown_components)

    return register_pipeline


def _other_collection_warning(params, champion: str | None) -> None:
    """The champion this version was judged against was trained on another collection:
    a change of data in this project, or another project writing to the same MLflow
    server under the same model names, whose champion this run's gate may just have
    replaced. Said, with the setting that keeps projects apart."""
    from training.stages import REGISTRY_PREFIX_ENV
    from training.tracking.lineage import other_collection

    if champion in (None, "None"):
        return
    try:
        theirs = other_collection(params, str(champion))
    except Exception:  # a warning only: the version is registered and judged already
        return
    if theirs:
        typer.echo(
            f"[kiln] evaluate: warning: the champion v{champion} was trained on {theirs}. "
            f"If another project shares this MLflow server, give each its own "
            f'{REGISTRY_PREFIX_ENV} (README, "Several projects on one server")',
            err=True,
        )


def _stage_command(stage: str) -> Callable[[], None]:
    """``kiln <stage>``: run the phase's ``stage(params, tracker)`` in the adapter, after
    its ``check_inputs(params)`` if it has one. The phase module is imported by name from
    the stage table, so this module imports no phase (each stage's DVC deps list its own
    phase only)."""

    def command() -> None:
        phase = importlib.import_module(BY_NAME[stage].phase)
        run_stage(stage, phase.stage, _register(stage), getattr(phase, "check_inputs", None))

    command.__doc__ = BY_NAME[stage].help
    return command


@app.command()
def ingest(
    url_list: Annotated[
        Path | None, typer.Option(help="parquet/csv/tsv/jsonl of image URLs and captions")
    ] = None,
    folder: Annotated[Path | None, typer.Option(help="images with sidecar .txt captions")] = None,
    shards: Annotated[
        str | None, typer.Option(help="webdataset tars: path, glob, {00..09} pattern or URLs")
    ] = None,
    url_col: Annotated[str | None, typer.Option(help="URL column of --url-list")] = None,
    caption_col: Annotated[str | None, typer.Option(help="caption column of --url-list")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder (outside DVC)")] = None,
    allow_network: Annotated[
        list[str] | None,
        typer.Option(help="CIDR the fetch guard may contact (repeatable), e.g. 10.0.0.0/8"),
    ] = None,
) -> None:
    """Stage 1: fetch a source with img2dataset into webdataset shards.

    Without options this is the DVC stage (params.yaml -> data/raw). With --out it runs
    standalone: params.yaml's ingest settings (if the file exists) with these options on
    top, written to --out; no MLflow run. Source options without --out are refused:
    written into data/raw outside DVC and the run lock, the next pipeline run would
    re-ingest params.yaml's source over them."""
    from training import config

    # by name, like every stage's phase: the other stages' commands must not import it
    phase = importlib.import_module(BY_NAME["ingest"].phase)

    sources_given = [
        (k, v)
        for k, v in (("url-list", url_list), ("folder", folder), ("shards", shards))
        if v is not None
    ]
    if len(sources_given) > 1:
        fail("give one of --url-list, --folder, --shards")
    options = bool(sources_given or url_col or caption_col or allow_network)
    if options and out is None:
        fail(
            "ingest: source options run ingest outside DVC and need --out DIR; for the "
            "pipeline's data/raw put them in params.yaml (kiln run --dataset KIND --source "
            "PATH; ingest.allow_networks, ingest.url_col, ingest.caption_col)"
        )
    if out is None:
        run_stage("ingest", phase.stage)
        return
    updates: dict = {}
    if sources_given:
        updates.update(dataset=sources_given[0][0], source=str(sources_given[0][1]))
    if url_col:
        updates["url_col"] = url_col
    if caption_col:
        updates["caption_col"] = caption_col
    try:
        raw = raw_params()
        if allow_network:
            nets = importlib.import_module("training.intake.guard").parse_networks(allow_network)
            updates["allow_networks"] = [*raw.get("ingest", {}).get("allow_networks", []), *nets]
        raw["ingest"] = {**(raw.get("ingest") or {}), **updates}
        params = config.resolve(raw, source=str(P.PARAMS) if P.PARAMS.exists() else "defaults")
        dest = out
        writable(dest)
        phase.run(params, dest, dest / ".work")  # what dest already holds is kept
    except (config.ConfigError, ValueError, OSError, RuntimeError) as exc:
        if os.environ.get("KILN_DEBUG"):
            raise
        fail(f"ingest: {exc}")
    except KeyboardInterrupt:
        fail("ingest: interrupted; run the same command again to resume (finished shards are kept)")


@app.command(SOURCE_PROBE)
def source() -> None:
    """Fingerprint the ingest source into data/source.json (DVC's probe: ingest re-runs
    when it changes). Prints whether it changed since the last check."""
    from training import config
    from training.disk import write_json

    phase = importlib.import_module(BY_NAME["ingest"].phase)
    failure_note(SOURCE_PROBE).unlink(missing_ok=True)
    try:
        state = phase.source_state(load_params())
    except (config.ConfigError, ValueError) as exc:  # SourceError: no retry helps
        record_failure(SOURCE_PROBE, f"source: {exc}", retry=False)
        fail(f"source: {exc}")
    except OSError as exc:
        record_failure(SOURCE_PROBE, f"source: {exc}", retry=transient(exc))
        fail(f"source: {exc}")
    old = json.loads(P.SOURCE.read_text()) if P.SOURCE.is_file() else {}
    write_json(P.SOURCE, state)
    what = state["source"] or f"the built-in {state['dataset']} set (its params say it all)"
    changed = "unchanged" if old == state else "changed: ingest will run"
    typer.echo(f"[kiln] source: {what}: {state['entries']} entries, {changed}", err=True)


for _spec in STAGES[1:]:  # ingest has its own command above (it also runs standalone)
    app.command(_spec.command)(_stage_command(_spec.name))
