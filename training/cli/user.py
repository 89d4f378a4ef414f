"""The user commands: ``kiln run`` (the whole pipeline), ``generate``, ``export``,
``publish``, ``ruler``, ``playground`` and ``doctor``, plus the full ``kiln`` app (these and the
stage commands).

No stage imports this module (``training/cli/__init__.py`` routes a stage command to
``training/cli/stage.py`` alone), so editing a user command re-runs no stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Annotated

import typer

from training import paths as P
from training.cli import ruler, stage
from training.cli.base import UserError, fail, load_params, writable
from training.cli.control import (
    base_pipeline,
    copy_kiln_files,
    export_controlnet,
    find_control,
    own_controlnet,
    with_control,
)
from training.cli.outputs import below_one, can_create, claimed, next_index, warn_prompts
from training.config import SAMPLER
from training.inference.requests import MAX_GUIDANCE, MIN_GUIDANCE
from training.stages import PIPELINE_MODEL
from training.tracking.versions import pipeline_dir

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Kiln: data-to-model pipeline for latent text-to-image diffusion.",
)
CHAMPION = f"models:/{PIPELINE_MODEL}@champion"


@app.command("run")
def run_pipeline(
    dataset: Annotated[
        str | None,
        typer.Option(help="shapes | digits (built-in) | url-list | folder | shards"),
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(
            help="url-list: a parquet/csv/tsv/jsonl file; folder: a directory of images "
            "with .txt captions; shards: webdataset tars (path, glob, {000..009}, URLs)"
        ),
    ] = None,
    profile: Annotated[str | None, typer.Option(help="tiny | tiny64 | small | base")] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            help="scratch | continue: build on the registered @champion (reuse its VAE "
            "and CLIP, fine-tune its U-Net)"
        ),
    ] = None,
) -> None:
    """Run the whole pipeline (Prefect flow over the DVC stages; DVC skips what is fresh).

    --dataset/--source/--profile/--mode are written into params.yaml first, where DVC
    tracks them.
    """
    from training import config, doctor, runlock

    for problem in doctor.problems():  # fail in one line, not inside Prefect's server
        fail(f"environment: {problem}")
    from training.intake.ingest import check_source
    from training.intake.sources import SourceError
    from training.params_file import read_value

    with contextlib.ExitStack() as stack:
        try:  # before params.yaml changes: another run may be using it
            stack.enter_context(runlock.pipeline_lock("kiln run", Path.cwd()))
            now = read_value(P.PARAMS, "ingest.dataset")  # kept by a run without --dataset
            updates = config.run_choices(dataset, source, profile, mode, now)
            # a missing source or distributor fails now, not after the flow has started,
            # and before params.yaml changes (a refused --source must not stay there)
            changed = config.set_values(P.PARAMS, updates, check_source) if updates else {}
            params = load_params()
            check_source(params)
        except (config.ConfigError, runlock.PipelineBusy) as exc:
            fail(str(exc))
        except SourceError as exc:
            fail(f"ingest: {exc}")
        except OSError as exc:  # .kiln/ not writable, a full disk
            fail(f"cannot start the run: {exc}")
        for key, (old, new) in changed.items():
            typer.echo(f"params.yaml: {key}: {old} -> {new}")
        from flows.pipeline import kiln_pipeline
        from training.cli.interrupt import stop_on_interrupt

        stop_on_interrupt()
        try:
            summary = kiln_pipeline()
        except Exception as exc:
            if os.environ.get("KILN_DEBUG"):
                raise
            failed = getattr(exc, "stage", None)
            if failed and getattr(exc, "said", False):  # its one-line error is above
                typer.echo(f"kiln: pipeline stopped at stage {failed} (error above)", err=True)
                raise typer.Exit(1) from None
            fail(f"pipeline failed: {exc}")
    typer.echo(summary["text"])


@app.command()
def generate(
    prompts: Annotated[list[str], typer.Argument(help="one or more prompts")],
    out: Annotated[Path, typer.Option("--out", help="output directory")] = Path("samples"),
    n: Annotated[int, typer.Option("-n", min=1, max=1000, help="images per prompt")] = 1,
    steps: Annotated[int, typer.Option(min=1, max=1000, help="sampler steps")] = SAMPLER.steps,
    guidance: Annotated[
        float | None,
        typer.Option(
            # check_request's bounds, so typer refuses what it would (below 1 diffusers
            # draws the scale-1 picture)
            min=MIN_GUIDANCE,
            max=MAX_GUIDANCE,
            help=f"classifier-free guidance scale, {MIN_GUIDANCE:g} to {MAX_GUIDANCE:g} "
            "(1: off); default: the model's, chosen by "
            f"its evaluation (else {SAMPLER.guidance:g})",
        ),
    ] = None,
    guidance_start: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            callback=below_one,  # [0, 1) as check_request: typer's max is inclusive
            help="the noisiest fraction of the steps sampled without guidance, in [0, 1) "
            "(0: guide every step); default: the model's, chosen by its evaluation (else "
            f"{SAMPLER.guidance_start:g})",
        ),
    ] = None,
    negative: Annotated[str, typer.Option(help="negative prompt")] = SAMPLER.negative_prompt,
    seed: Annotated[
        int, typer.Option(min=0, help="seed of the first image; image k uses seed+k")
    ] = 0,
    width: Annotated[
        int | None, typer.Option(min=1, help="pixels; default: the trained size")
    ] = None,
    height: Annotated[
        int | None, typer.Option(min=1, help="pixels; default: the trained size")
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="dpm++ | ddim | ddpm | euler; default: the model's own, the one it was saved "
            "and evaluated with (evaluate.scheduler), as the REST model samples"
        ),
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            help="a registry URI (models:/kiln-text2image/3), an alias, or a pipeline dir"
        ),
    ] = CHAMPION,
    control: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="a picture whose Canny edges steer the layout (train_controlnet), or an "
            "edge map with --control-is-map",
        ),
    ] = None,
    control_scale: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=10.0,
            help="weight of the ControlNet (0: off, at most 10); default: the scale its "
            "stage evaluated it at (train_controlnet.conditioning_scale)",
        ),
    ] = None,
    control_is_map: Annotated[
        bool, typer.Option(help="--control is already an edge map: use it as it is")
    ] = False,
    controlnet: Annotated[
        str,
        typer.Option(
            help="the ControlNet: a folder or models:/kiln-controlnet/N (default: the one "
            "inside --model's directory (kiln export --controlnet) or shipped with its "
            "version, else data/models/controlnet)"
        ),
    ] = "",
) -> None:
    """Generate PNGs plus manifest.jsonl (file, prompt, seed, steps, guidance, size, scheduler)."""
    try:  # everything that can be checked before a model load
        if any(not p.strip() for p in prompts):
            raise UserError("a prompt is empty")
        if control is None and (control_scale is not None or control_is_map or controlnet):
            raise UserError("--control-scale, --control-is-map and --controlnet need --control")
        can_create(out)
        next_index(out)  # readable? (the number itself is taken when writing, below)
        from training.inference import defaults, sampling

        if scheduler is not None and scheduler not in sampling.SCHEDULERS:
            raise UserError(
                f"unknown scheduler {scheduler!r} (choose {', '.join(sampling.SCHEDULERS)})"
            )
        # checked now, set below
        g = SAMPLER.guidance if guidance is None else guidance
        start = SAMPLER.guidance_start if guidance_start is None else guidance_start
        reqs = [  # the same checks as a REST request's rows
            sampling.Request(p, seed + k, steps, g, negative, width, height, start)
            for p in prompts
            for k in range(n)
        ]
        for r in reqs:
            sampling.check_request(r)
        pipe_dir, version = pipeline_dir(model)
        own_net_dir = own_controlnet(pipe_dir)  # a ControlNet pipeline (kiln export --controlnet)
        # what this model's evaluation chose and scored, where the caller gave nothing
        own = defaults.recommended(pipe_dir)
        g = own.guidance if guidance is None else g
        start = own.guidance_start if guidance_start is None else start
        reqs = [dataclasses.replace(r, guidance=g, guidance_start=start) for r in reqs]
        if guidance is None or guidance_start is None:
            # the model's own values (kiln_sampler.json) were not checked above; evaluate
            # may have saved a scale below 1, which would be drawn as 1 yet recorded
            try:
                sampling.check_request(reqs[0])  # the same values in every request
            except ValueError as exc:
                raise UserError(
                    f"{pipe_dir}: the model's own sampler setting: {exc}; pass --guidance "
                    "and --guidance-start"
                ) from None
        from training.engine.distributed import set_torch_threads

        set_torch_threads()
        cn = None if control is None else find_control(
            control, controlnet, pipe_dir, own_net_dir, control_scale
        )  # fmt: skip
        pipe = sampling.load(pipe_dir)
        own_net = None
        if own_net_dir is not None:
            # a ControlNet pipeline cannot draw without a control image: the base model
            # draws from its own components, and --control puts a ControlNet back on
            own_net, pipe = pipe.controlnet, base_pipeline(pipe)
        if scheduler is not None:  # else the model's own, as the REST model and evaluate
            sampling.set_scheduler(pipe, scheduler)
        used = defaults.scheduler_name(type(pipe.scheduler).__name__, pipe.scheduler.config)
        size = sampling.Geometry.of(pipe).size(reqs[0])  # one size for all: checked once
        steer = None
        if cn is not None:
            same = own_net_dir is not None and cn.folder.resolve() == own_net_dir.resolve()
            pipe, steer = with_control(pipe, cn, size, control_is_map, own_net if same else None)
    except (UserError, ValueError) as exc:
        fail(str(exc))
    warn_prompts(pipe.tokenizer, [*prompts, negative] if negative else list(prompts))
    if negative and g <= 1:
        typer.echo("kiln: warning: --negative does nothing at guidance 1 (none recorded)", err=True)
    images = sampling.generate(pipe, reqs, control=steer)
    from training.disk import save_picture

    with claimed(out) as (first, manifest):  # numbering continues after what --out holds
        for i, (r, img) in enumerate(zip(reqs, images, strict=True)):
            name = f"{first + i:04d}-{sampling.slug(r.prompt)}-{r.seed}.png"
            line = sampling.manifest_line(name, r, img, used, model, version)
            if cn is not None:
                line |= {"control": str(control), "control_scale": cn.scale, "controlnet": cn.name}
            try:  # a full disk: one line, and every picture written has its line
                save_picture(out / name, img, manifest, line, i, "run kiln generate again")
            except UserError as exc:
                fail(str(exc))
    from training.evaluation.guidance import describe

    how = "the model's" if guidance is None and guidance_start is None else "as asked"
    if (guidance is None) != (guidance_start is None):  # one given, one the model's
        scale = "as asked" if guidance is not None else "the model's"
        start_how = "as asked" if guidance_start is not None else "the model's"
        how = f"scale {scale}, start {start_how}"
    typer.echo(
        f"wrote {len(images)} images and manifest.jsonl to {out} "
        f"(guidance {describe(g, start)}, {how})"
    )


@app.command()
def export(
    out: Annotated[Path, typer.Argument(help="directory for the diffusers pipeline")],
    model: Annotated[
        str, typer.Option(help="registry URI, alias or pipeline directory")
    ] = CHAMPION,
    controlnet: Annotated[
        str | None,
        typer.Option(
            help="also a ControlNet (a folder or models:/kiln-controlnet/N): writes a "
            "StableDiffusionControlNetPipeline"
        ),
    ] = None,
) -> None:
    """Write the model's diffusers pipeline directory (StableDiffusionPipeline, or
    StableDiffusion3Pipeline for the DiT backbone, or StableDiffusionControlNetPipeline
    with --controlnet; loads offline with from_pretrained)."""
    from training.cli.outputs import check_new_folder, whole_folder
    from training.inference import sampling
    from training.inference.control import attach

    try:
        check_new_folder(out)
        pipe_dir = pipeline_dir(model)[0]
        cn_dir = export_controlnet(controlnet, pipe_dir)  # checked before anything is written
        writable(out.parent)
        pipe = sampling.load(pipe_dir)
        if cn_dir is not None:
            pipe = attach(pipe, cn_dir)[0]
    except UserError as exc:
        fail(str(exc))
    with whole_folder(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        copy_kiln_files(pipe_dir, cn_dir, tmp)
    typer.echo(f"exported {type(pipe).__name__} to {out}")
    if type(pipe).__name__ == "StableDiffusion3Pipeline":  # no T5: diffusers needs told
        typer.echo("load it with from_pretrained(DIR, text_encoder_3=None, tokenizer_3=None)")


@app.command()
def publish(
    remote: Annotated[
        str | None,
        typer.Argument(help="s3://bucket/prefix (default: $KILN_DATA_REMOTE)"),
    ] = None,
) -> None:
    """Upload the clean and latent splits to object storage, for training to stream from.

    The endpoint and credentials are boto3's (AWS_ENDPOINT_URL for MinIO and other
    S3-compatible stores). Training reads them there when KILN_DATA_REMOTE is set."""
    from training.intake.publish import publish as upload
    from training.intake.store import REMOTE_ENV

    target = remote or os.environ.get(REMOTE_ENV, "")
    if not target:
        fail(f"publish: give s3://bucket/prefix or set {REMOTE_ENV}")
    try:
        done = upload(P.DATA, target)
    except UserError as exc:
        fail(str(exc))
    typer.echo(
        f"published to {target}: {done['uploaded']} files uploaded, "
        f"{done['already_there']} already there"
    )


@app.command()
def playground(
    host: Annotated[
        str, typer.Option(help="address to listen on (loopback by default: no login)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 7860,
    allow_promote: Annotated[
        bool, typer.Option(help="show the button that makes a version @champion")
    ] = False,
    queue: Annotated[
        int, typer.Option(min=1, max=1000, help="jobs that may wait; more get 'busy'")
    ] = 8,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(help="a name clients reach it by (beyond loopback's and --host)"),
    ] = None,
) -> None:
    """A web page to try the registered kiln-text2image versions, compare two side by
    side and (with --allow-promote) make one @champion. Images go to data/playground/."""
    from training.playground.app import listen_check, serve

    try:  # a taken port is a one-line error, before torch loads
        for warning in listen_check(host, port):
            typer.echo(f"kiln: warning: {warning}", err=True)
    except UserError as exc:
        fail(str(exc))
    typer.echo(f"Kiln playground: http://{host}:{port}/ (Ctrl-C stops it)")
    serve(host, port, P.DATA / "playground", allow_promote, queue, allowed_host or ())


@app.command()
def doctor() -> None:
    """Check the environment for the known dependency traps."""
    from training.doctor import main

    raise typer.Exit(main())


# `kiln ruler` (its own module), then the stage commands, after the user commands in --help
app.registered_commands.extend(ruler.app.registered_commands)
app.registered_commands.extend(stage.app.registered_commands)
