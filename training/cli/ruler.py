"""``kiln ruler``: train and register the fixed ruler CLIP that evaluate measures FD and
CMMD with (``training/evaluation/ruler.py`` says why; ``training/phases/ruler.py``
trains it)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from training import paths as P
from training.cli.base import UserError, fail, load_params, require, writable
from training.evaluation.ruler import DEFAULT_SEED

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def ruler(
    steps: Annotated[
        int | None,
        typer.Option(min=1, help="CLIP training steps (default: twice the profile's)"),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="the ruler's pinned seed, never the pipeline's (default 1, else 0)"),
    ] = None,
    use: Annotated[
        bool, typer.Option(help="set evaluate.ruler in params.yaml to the new ruler")
    ] = True,
) -> None:
    """Train a fixed ruler for data without an oracle: a CLIP trained once on data/clean,
    registered as kiln-ruler, that evaluate then measures fd_clip and cmmd_clip with, so
    runs on one collection are compared in one space (README, "A fixed ruler")."""
    from training import config, runlock
    from training import engine as E
    from training.errors import TrainingDiverged
    from training.phases import ruler as R

    require(P.CLEAN / "train", P.CLEAN / "val")
    with contextlib.ExitStack() as stack:
        try:  # the pipeline writes data/ and params.yaml: not while it runs
            stack.enter_context(runlock.pipeline_lock("kiln ruler", Path.cwd()))
            params = load_params()
        except (config.ConfigError, runlock.PipelineBusy) as exc:
            fail(str(exc))
        if seed is None:
            seed = DEFAULT_SEED if params.seed != DEFAULT_SEED else 0
        if seed == params.seed:  # the run's own CLIP's seed: the bend the ruler avoids
            fail(
                f"ruler: --seed {seed} is the pipeline's seed (params.yaml seed); a ruler "
                "needs its own (the default is 1, or 0 when the pipeline's is 1)"
            )
        n = steps or 2 * params.train_clip.steps
        out = P.DATA / "ruler"
        writable(out)
        typer.echo(f"ruler: training a {params.profile} CLIP on {P.CLEAN}, seed {seed}, {n} steps")
        E.init_distributed()  # torch's threads, as a stage sets them
        try:
            version, metrics = R.make(params, P.CLEAN, out, P.CKPT / "ruler", n, seed)
        except (UserError, TrainingDiverged, ConnectionError, OSError, ValueError) as exc:
            # one line, as a stage says it; the checkpoints stay for a re-run to resume
            fail(f"ruler: {exc}")
        uri = f"models:/{R.RULER_MODEL}/{version}"
        recall = metrics.get("val_i2t_r1")
        typer.echo(
            f"ruler: registered {uri} ({R.describe(out)}"
            + (f"; val recall@1 image->text {recall:.2f}" if recall is not None else "")
            + ")"
        )
        if use:
            for key, (old, new) in config.set_values(P.PARAMS, {"evaluate.ruler": uri}).items():
                typer.echo(f"params.yaml: {key}: {old} -> {new}")
        else:
            typer.echo(f"to measure with it: evaluate.ruler: {uri} in params.yaml")
