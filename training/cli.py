"""``kiln``: the command line. Each stage command is a thin adapter: load the typed config,
check inputs, open the MLflow run, call the phase's ``run()``, register what it made.

Errors a user can fix (bad params, missing inputs, unwritable output, diverged
training) end with one ``kiln: error: ...`` line and exit code 1; the stage's partial
outputs are removed so nothing half-written looks valid. ``KILN_DEBUG=1`` shows the
traceback instead.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from training.env import offline_defaults

offline_defaults()

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Kiln: data-to-model pipeline for latent text-to-image diffusion.",
)

DATA = Path("data")
RAW, CLEAN, LATENTS, EVAL = DATA / "raw", DATA / "clean", DATA / "latents", DATA / "eval"
DOCS = DATA / "data_docs"  # validate's GX Data Docs (time-stamped: kept out of CLEAN's hash)
MODELS = {
    "train_vae": DATA / "models" / "vae",
    "train_clip": DATA / "models" / "clip",
    "train_unet": DATA / "models" / "unet",
}
CKPT, WORK, METRICS = DATA / "checkpoints", DATA / ".work", DATA / "metrics"
PARAMS = Path("params.yaml")
STATE = Path(".kiln")  # the run lock and failure notes (git-ignored)


class UserError(Exception):
    """An error the user can act on; printed as one line, no traceback."""


def fail(msg: str) -> None:
    typer.echo(f"kiln: error: {msg}", err=True)
    raise typer.Exit(1)


def _prefixed(stage: str, msg: str) -> str:
    """``stage: msg``, without doubling a prefix the message already carries."""
    return msg if msg.startswith(f"{stage}:") or msg.startswith(f"{stage} ") else f"{stage}: {msg}"


# Errno values of failures that may pass on their own (a server restarting, a network
# blip); a retry can help those, and only those.
_TRANSIENT_ERRNOS = {
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EPIPE,
    errno.EAGAIN,
}


def transient(exc: BaseException) -> bool:
    """Whether a retry of the same stage could succeed (the flow retries only those)."""
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def _record_failure(stage: str, msg: str, retry: bool) -> None:
    """Leave the flow a note: why the stage failed and whether retrying can help. A stage
    that dies without a word (killed, out of memory) leaves none and is retried."""
    from training import mechanics

    # a full or read-only disk leaves no note: the flow then treats it as retryable
    with contextlib.suppress(OSError):
        mechanics.write_json(failure_note(stage), {"message": msg, "retry": retry})


def failure_note(stage: str) -> Path:
    return STATE / f"failed-{stage}.json"


def _load_params(path: Path = PARAMS):
    from training import config

    return config.load(path)


def _require(*paths: Path) -> None:
    for p in paths:
        if not p.exists() or (p.is_dir() and not any(p.iterdir())):
            raise UserError(
                f"missing stage input {p}: run the upstream stage first (`dvc repro` or `kiln run`)"
            )


def _writable(*dirs: Path) -> None:
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / ".kiln-write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"output directory {d} is not writable ({exc.strerror})") from None


def run_stage(
    stage: str,
    outs: list[Path],
    inputs: list[Path],
    body: Callable[..., dict],
    register: Callable | None = None,
) -> dict:
    """The shared adapter: config -> checks -> MLflow run -> phase -> metrics/registry."""
    from training import config, mechanics, runlock, tracking

    if stage in DATA_PARALLEL_STAGES and _relaunch_under_torchrun(stage):
        return {}
    if mechanics.world_size() > 1 and not mechanics.is_main():
        return _follower(stage, body)
    try:  # before anything is touched: the running pipeline owns data/
        runlock.check_free(stage)
    except runlock.PipelineBusy as exc:
        fail(str(exc))
    t0 = time.perf_counter()
    failure_note(stage).unlink(missing_ok=True)
    try:
        mechanics.init_distributed()
        params = _load_params()
        _require(*inputs)
        _writable(*outs, METRICS)
        _cleanup(outs)  # DVC removes outs before a run; do the same outside DVC
        resolved = outs[0] / "resolved_params.json"  # every run records its config
        mechanics.write_json(resolved, params.to_dict())
        with tracking.stage_run(stage, params.to_dict(), resolved) as tr:
            with mechanics.disk_full_errors(f"{stage} output", outs[0]):
                metrics = body(params, tr)
            metrics["stage_seconds"] = time.perf_counter() - t0
            tr.log_metrics(metrics)
            if register is not None:
                metrics["registered_version"] = register(tr, metrics)
            metrics["mlflow_run_id"] = tr.run_id
        mechanics.write_json(METRICS / f"{stage}.json", metrics)
        return metrics
    except (config.ConfigError, UserError, mechanics.TrainingDiverged) as exc:
        _cleanup(outs)
        _record_failure(stage, str(exc), retry=False)
        fail(str(exc))
    except (OSError, ValueError, RuntimeError) as exc:
        _cleanup(outs)
        _record_failure(stage, _prefixed(stage, str(exc)), retry=transient(exc))
        if os.environ.get("KILN_DEBUG"):
            raise
        fail(_prefixed(stage, str(exc)))
    except KeyboardInterrupt:
        _cleanup(outs)
        _record_failure(stage, "interrupted", retry=False)
        typer.echo(
            f"kiln: {stage}: interrupted (re-run it: training resumes from its last "
            "checkpoint, ingest keeps its finished shards)",
            err=True,
        )
        raise typer.Exit(130) from None
    return {}


# KILN_NPROC applies to these: the training stages split each batch over processes;
# precompute_latents splits the shards (by node, then by DataLoader worker).
DATA_PARALLEL_STAGES = ("train_vae", "train_clip", "precompute_latents", "train_unet")


def _relaunch_under_torchrun(stage: str) -> bool:
    """``KILN_NPROC=N`` (N > 1): run this stage as N data-parallel processes under
    ``torchrun --standalone`` (gloo on the CPU, NCCL on GPUs). Like ``KILN_DEVICE`` it is
    an environment setting: the global batch, and so the result, does not depend on it.
    Multi-node: run ``torchrun --nnodes ... -m training.cli train-unet`` yourself."""
    try:
        n = int(os.environ.get("KILN_NPROC", "1"))
    except ValueError:
        fail(f"KILN_NPROC must be a whole number, got {os.environ['KILN_NPROC']!r}")
    if n <= 1 or "WORLD_SIZE" in os.environ:
        return False
    import subprocess

    typer.echo(f"[kiln] {stage}: {n} data-parallel processes (torchrun)", err=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n}",
        "-m",
        "training.cli",
        stage.replace("_", "-"),
    ]
    rc = subprocess.call(cmd)
    if rc != 0:
        fail(f"{stage}: a data-parallel process failed (exit {rc}); its error is above")
    return True


def _follower(stage: str, body: Callable[..., dict]) -> dict:
    """Ranks 1..N-1: train in lockstep with rank 0, which alone logs, checkpoints,
    saves and registers."""
    from training import mechanics

    try:
        mechanics.init_distributed()
        body(_load_params(), mechanics.NullLogger())
    except Exception as exc:
        if os.environ.get("KILN_DEBUG"):
            raise
        fail(f"{stage} (rank {mechanics.rank()}): {exc}")
    return {}


def _cleanup(outs: list[Path]) -> None:
    for out in outs:
        if out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
        elif out.exists():
            out.unlink()


# ---- stage commands (what dvc.yaml runs) -----------------------------------------------
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

    Without options this is the DVC stage (params.yaml -> data/raw). With a source or
    --out it runs standalone: params.yaml's ingest settings (if the file exists) with
    these options on top, written to --out (default data/raw); no MLflow run."""
    from training import config
    from training import ingest as phase

    sources_given = [
        (k, v)
        for k, v in (("url-list", url_list), ("folder", folder), ("shards", shards))
        if v is not None
    ]
    if len(sources_given) > 1:
        fail("give one of --url-list, --folder, --shards")
    standalone = bool(sources_given or out or url_col or caption_col or allow_network)
    if not standalone:
        run_stage("ingest", [RAW], [], lambda p, tr: phase.run(p, RAW, WORK / "ingest"))
        return
    updates: dict = {}
    if sources_given:
        updates.update(dataset=sources_given[0][0], source=str(sources_given[0][1]))
    if url_col:
        updates["url_col"] = url_col
    if caption_col:
        updates["caption_col"] = caption_col
    try:
        raw = _raw_params()
        if allow_network:
            from training.fetch import parse_networks

            nets = parse_networks(allow_network)
            updates["allow_networks"] = [*raw.get("ingest", {}).get("allow_networks", []), *nets]
        raw["ingest"] = {**(raw.get("ingest") or {}), **updates}
        params = config.resolve(raw, source=str(PARAMS) if PARAMS.exists() else "defaults")
        dest = out or RAW
        _writable(dest)
        _cleanup([dest / "shards", dest / "report.json", dest / "rejects.parquet"])
        phase.run(params, dest, dest / ".work")
    except (config.ConfigError, ValueError, OSError, RuntimeError) as exc:
        if os.environ.get("KILN_DEBUG"):
            raise
        fail(f"ingest: {exc}")
    except KeyboardInterrupt:
        fail("ingest: interrupted; run the same command again to resume (finished shards are kept)")


def _raw_params() -> dict:
    import yaml

    if not PARAMS.exists():
        return {}
    return yaml.safe_load(PARAMS.read_text()) or {}


@app.command()
def validate() -> None:
    """Stage 2: Great Expectations gate; writes clean train/val shards and rejects."""
    from training import validate as phase

    def body(p, tr) -> dict:
        report = phase.run(p, RAW, CLEAN, DOCS)
        tr.log_metrics(phase.metrics(report))
        tr.log_artifacts(DOCS, "data_docs")
        return report

    run_stage("validate", [CLEAN, DOCS], [RAW], body)


def _register_dir(stage: str) -> Callable:
    from training.tracking import MODEL_NAMES

    return lambda tr, metrics: tr.register_dir(MODEL_NAMES[stage], MODELS[stage], metrics)


@app.command("train-vae")
def train_vae() -> None:
    """Stage 3: train the AutoencoderKL; registers kiln-vae."""
    from training import vae

    out = MODELS["train_vae"]
    run_stage(
        "train_vae",
        [out],
        [CLEAN],
        lambda p, tr: vae.run(p, CLEAN, out, CKPT / "train_vae", tr),
        _register_dir("train_vae"),
    )


@app.command("train-clip")
def train_clip() -> None:
    """Stage 4: train the tokenizer and CLIPModel; registers kiln-clip."""
    from training import clip

    out = MODELS["train_clip"]
    run_stage(
        "train_clip",
        [out],
        [CLEAN],
        lambda p, tr: clip.run(p, CLEAN, out, CKPT / "train_clip", tr),
        _register_dir("train_clip"),
    )


@app.command("precompute-latents")
def precompute_latents() -> None:
    """Stage 5: VAE posteriors + CLIP text states for every clean sample."""
    from training import latents

    run_stage(
        "precompute_latents",
        [LATENTS],
        [CLEAN, MODELS["train_vae"], MODELS["train_clip"]],
        lambda p, tr: latents.run(p, CLEAN, MODELS["train_vae"], MODELS["train_clip"], LATENTS),
    )


@app.command("train-unet")
def train_unet() -> None:
    """Stage 6: train the conditional U-Net on the latents; registers kiln-unet."""
    from training import unet

    out = MODELS["train_unet"]
    run_stage(
        "train_unet",
        [out],
        [LATENTS, MODELS["train_vae"]],
        lambda p, tr: unet.run(p, LATENTS, MODELS["train_vae"], out, CKPT / "train_unet", tr),
        _register_dir("train_unet"),
    )


@app.command()
def evaluate() -> None:
    """Stage 7: sample the evaluation prompts, score them, register kiln-text2image."""
    from training import evaluate as phase
    from training.tracking import MODEL_NAMES

    def register(tr, metrics: dict) -> str:
        from training import tracking

        for name in ("report.html", "samples.png"):  # the pipeline is logged with the model
            tr.log_image(EVAL / name, "evaluation")
        name = MODEL_NAMES["evaluate"]
        version = tr.register_text2image(name, EVAL / "pipeline", metrics)
        params = _load_params()
        metric = params.gate_metric()
        gate = tracking.promote(name, version, metrics, metric, params.evaluate.gate_min_delta)
        tr.log_metrics({k: v for k, v in gate.items() if isinstance(v, float)})
        tr.mlflow.set_tag("gate_decision", gate["gate_decision"])
        metrics.update(gate)
        old = gate["gate_champion_value"]
        vs = (
            "no champion yet"
            if old is None
            else (f"champion v{gate['gate_champion_version']} has {old:.4f}")
        )
        typer.echo(
            f"[kiln] evaluate: gate: {name} v{version} {metric}={gate['gate_value']:.4f}, "
            f"{vs} -> @{gate['gate_decision']}",
            err=True,
        )
        return version

    run_stage(
        "evaluate",
        [EVAL],
        [CLEAN, *MODELS.values()],
        lambda p, tr: phase.run(
            p, CLEAN, MODELS["train_vae"], MODELS["train_clip"], MODELS["train_unet"], EVAL, tr
        ),
        register,
    )


# ---- user commands ---------------------------------------------------------------------
@app.command("run")
def run_pipeline(
    dataset: Annotated[str | None, typer.Option(help="shapes | digits | url-list")] = None,
    profile: Annotated[str | None, typer.Option(help="tiny | small | base")] = None,
) -> None:
    """Run the whole pipeline (Prefect flow over the DVC stages; DVC skips what is fresh).

    --dataset/--profile are written into params.yaml first, where DVC tracks them.
    """
    from training import config, doctor, runlock

    for problem in doctor.problems():  # fail in one line, not inside Prefect's server
        fail(f"environment: {problem}")
    updates = {k: v for k, v in (("ingest.dataset", dataset), ("profile", profile)) if v}
    with contextlib.ExitStack() as stack:
        try:  # before params.yaml changes: another run may be using it
            stack.enter_context(runlock.pipeline_lock("kiln run", Path.cwd()))
            changed = config.set_values(PARAMS, updates) if updates else {}
            _load_params()
        except (config.ConfigError, runlock.PipelineBusy) as exc:
            fail(str(exc))
        except OSError as exc:  # .kiln/ not writable, a full disk
            fail(f"cannot start the run: {exc}")
        for key, (old, new) in changed.items():
            typer.echo(f"params.yaml: {key}: {old} -> {new}")
        from flows.pipeline import kiln_pipeline

        _stop_on_interrupt()
        try:
            summary = kiln_pipeline()
        except Exception as exc:
            if os.environ.get("KILN_DEBUG"):
                raise
            stage = getattr(exc, "stage", None)
            if stage and getattr(exc, "said", False):  # its one-line error is above
                typer.echo(f"kiln: pipeline stopped at stage {stage} (error above)", err=True)
                raise typer.Exit(1) from None
            fail(f"pipeline failed: {exc}")
    typer.echo(summary["text"])


INTERRUPTED = (
    "kiln: interrupted; re-run `kiln run` to resume (finished stages are kept, training "
    "resumes from its last checkpoint)"
)


def _stop_on_interrupt() -> None:
    """Ctrl-C (or SIGTERM) stops ``kiln run`` within seconds, exit code 130.

    Left to itself, an interrupt reaches Prefect's local API server too (the same
    process group), and the flow then spends minutes retrying a dead server before
    failing with the wrong reason. Instead: interrupt the stage processes (they clean
    up their partial outputs; checkpoints are atomic), mark the pipeline's MLflow run
    KILLED, say how to resume, and exit. A second Ctrl-C exits at once."""

    def stop(signum, frame) -> None:
        try:
            signal.signal(signal.SIGINT, lambda *_: os._exit(130))
            # os.write: the interrupted code may be inside sys.stderr.write itself
            os.write(2, f"\n{INTERRUPTED}\n".encode())
            _stop_children()
            _mark_pipeline_killed()
        finally:
            os._exit(130)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def _stop_children(grace_s: float = 20.0) -> None:
    """Stop every descendant, each signalled once, so a stage cleans up its partial
    outputs undisturbed (a second SIGINT could cut that short). DVC and the stage run in
    a session of their own that a terminal's Ctrl-C did not reach: SIGINT them. Those
    in our own process group (Prefect's local server) got the terminal's SIGINT already,
    unless only this process was signalled: SIGTERM them if they are still up after a
    moment. SIGKILL whatever is left after ``grace_s``."""
    import psutil

    children = psutil.Process().children(recursive=True)
    mine, others = [], []
    for child in children:
        try:
            (mine if os.getpgid(child.pid) == os.getpgrp() else others).append(child)
        except OSError:
            continue
    for child in others:
        with contextlib.suppress(psutil.Error):
            child.send_signal(signal.SIGINT)
    _, late = psutil.wait_procs(mine, timeout=3)
    for child in late:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(others + late, timeout=grace_s)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


def _mark_pipeline_killed(timeout_s: float = 5.0) -> None:
    """End the pipeline's MLflow run as KILLED (bounded: a dead server must not hold
    the exit; the next run closes it otherwise)."""
    import threading

    from training import tracking

    run_id = os.environ.get(tracking.PARENT_ENV)
    if not run_id:
        return

    def end() -> None:
        with contextlib.suppress(Exception):
            from mlflow import MlflowClient

            tracking.setup()
            MlflowClient().set_terminated(run_id, status="KILLED")

    t = threading.Thread(target=end, daemon=True)
    t.start()
    t.join(timeout_s)


def _pipeline_dir(model: str) -> tuple[Path, str]:
    """(StableDiffusionPipeline directory, version label) from a path, registry URI or
    alias of kiln-text2image."""
    p = Path(model).expanduser()
    version = str(p.resolve())
    if not p.exists():
        if model.startswith(("/", "./", "../", "~")):
            raise UserError(f"cannot resolve model {model!r}: no such pipeline directory")
        if not model.startswith("models:/"):
            model = (
                f"models:/{model}"
                if "/" in model or "@" in model
                else f"models:/kiln-text2image@{model}"
            )
        from training import tracking

        try:
            version = tracking.model_version(model)
            p = tracking.resolve_model_dir(f"models:/{version}")
        except Exception as exc:
            raise UserError(f"cannot resolve model {model!r}: {exc}") from None
    if (p / "MLmodel").is_file():
        p = p / "artifacts" / "pipeline"
    if not (p / "model_index.json").is_file():
        raise UserError(f"{p} is not a StableDiffusionPipeline directory (no model_index.json)")
    return p, version


def _can_create(d: Path) -> None:
    """Fail now if ``d`` could not be made or written, without creating it yet (a
    failed command must not leave an empty folder behind)."""
    probe = d.resolve()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise UserError(f"output directory {d} is not writable ({probe} is not a writable folder)")


def warn_truncated(tokenizer, prompts: list[str]) -> int:
    """Warn for each prompt longer than the text encoder's context: the model never sees
    the rest. Returns how many were cut."""
    limit = tokenizer.model_max_length
    cut = 0
    for prompt in dict.fromkeys(prompts):
        n = len(tokenizer(prompt, truncation=False).input_ids)
        if n > limit:
            cut += 1
            kept = tokenizer.decode(
                tokenizer(prompt, truncation=True, max_length=limit).input_ids,
                skip_special_tokens=True,
            )
            typer.echo(
                f"kiln: warning: prompt {prompt!r} is {n} tokens; the text encoder reads "
                f"{limit}, so only {kept!r} is used",
                err=True,
            )
    return cut


@app.command()
def generate(
    prompts: Annotated[list[str], typer.Argument(help="one or more prompts")],
    out: Annotated[Path, typer.Option("--out", help="output directory")] = Path("samples"),
    n: Annotated[int, typer.Option("-n", min=1, max=1000, help="images per prompt")] = 1,
    steps: Annotated[int, typer.Option(min=1, max=1000, help="sampler steps")] = 20,
    guidance: Annotated[
        float, typer.Option(min=0.0, max=100.0, help="classifier-free guidance scale (1: off)")
    ] = 4.0,
    negative: Annotated[str, typer.Option(help="negative prompt")] = "",
    seed: Annotated[
        int, typer.Option(min=0, help="seed of the first image; image k uses seed+k")
    ] = 0,
    scheduler: Annotated[str, typer.Option(help="dpm++ | ddim | ddpm | euler")] = "dpm++",
    model: Annotated[
        str,
        typer.Option(
            help="a registry URI (models:/kiln-text2image/3), an alias, or a pipeline dir"
        ),
    ] = "models:/kiln-text2image@champion",
) -> None:
    """Generate PNGs plus manifest.jsonl (file, prompt, seed, steps, guidance, scheduler)."""
    try:  # everything that can be checked before a model load
        if any(not p.strip() for p in prompts):
            raise UserError("a prompt is empty")
        _can_create(out)
        from training import sampling

        if scheduler not in sampling.SCHEDULERS:
            raise UserError(
                f"unknown scheduler {scheduler!r} (choose {', '.join(sampling.SCHEDULERS)})"
            )
        reqs = [  # the same checks as a REST request's rows
            sampling.Request(p, seed + k, steps, guidance, negative)
            for p in prompts
            for k in range(n)
        ]
        for r in reqs:
            sampling.check_request(r)
        pipe_dir, version = _pipeline_dir(model)
        from training.mechanics import set_torch_threads

        set_torch_threads()
        pipe = sampling.load(pipe_dir)
        sampling.set_scheduler(pipe, scheduler)
    except (UserError, ValueError) as exc:
        fail(str(exc))
    warn_truncated(pipe.tokenizer, [*prompts, negative] if negative else list(prompts))
    images = sampling.generate(pipe, reqs)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "manifest.jsonl", "a") as manifest:
        for i, (r, img) in enumerate(zip(reqs, images, strict=True)):
            name = f"{i:04d}-{sampling.slug(r.prompt)}-{r.seed}.png"
            img.save(out / name)
            manifest.write(
                json.dumps(
                    {
                        "file": name,
                        "prompt": r.prompt,
                        "seed": r.seed,
                        "steps": r.steps,
                        "guidance": r.guidance,
                        "negative_prompt": r.negative,
                        "scheduler": scheduler,
                        "model": model,
                        "model_version": version,
                    }
                )
                + "\n"
            )
    typer.echo(f"wrote {len(images)} images and manifest.jsonl to {out}")


@app.command()
def export(
    out: Annotated[Path, typer.Argument(help="directory for the diffusers pipeline")],
    model: Annotated[
        str, typer.Option(help="registry URI, alias or pipeline directory")
    ] = "models:/kiln-text2image@champion",
) -> None:
    """Write a diffusers StableDiffusionPipeline directory (loads offline with from_pretrained)."""
    from training import sampling

    try:
        pipe = sampling.load(_pipeline_dir(model)[0])
        _writable(out)
    except UserError as exc:
        fail(str(exc))
    pipe.save_pretrained(out, safe_serialization=True)
    typer.echo(f"exported StableDiffusionPipeline to {out}")


@app.command()
def doctor() -> None:
    """Check the environment for the known dependency traps."""
    from training.doctor import main

    raise typer.Exit(main())


def main() -> None:  # pragma: no cover - console entry
    try:
        app()
    except UserError as exc:
        typer.echo(f"kiln: error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
