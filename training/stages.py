"""The one table of Kiln's stages, in pipeline order.

Everything that needs the list of stages reads it here: the typed config (one params
section per stage), the CLI (one command per stage), the Prefect flow (the order), the
registry (which stage registers which model, made from which output), the dvc.yaml
checks and the tests. ``dvc.yaml`` repeats the names, commands and outs for DVC, and
``tests/test_dvc_deps.py`` holds it to this table.

Adding a stage: a phase module with ``stage(params, tracker) -> metrics``, one row here,
one stage in ``dvc.yaml``; the CLI command comes from the row.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from training import paths as P

# Put before every registered model's name and the MLflow experiment's: projects that
# share one MLflow server each set their own (KILN_REGISTRY_PREFIX=pets- makes
# pets-kiln-text2image). Was: fixed names, and a second project's gate re-scored and
# replaced the first's @champion, whose `kiln generate` then drew the other's pictures.
# Read once, at import: every process of a project (stages, flows, workers, serving)
# must be given the same value, as it is given MLFLOW_TRACKING_URI.
REGISTRY_PREFIX_ENV = "KILN_REGISTRY_PREFIX"
PREFIX = os.environ.get(REGISTRY_PREFIX_ENV, "").strip()
if PREFIX and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", PREFIX):
    raise SystemExit(
        f"kiln: error: {REGISTRY_PREFIX_ENV}={PREFIX!r}: letters, digits, '.', '_' and '-' "
        "only (at most 64, starting with a letter or digit), e.g. pets-"
    )


@dataclass(frozen=True)
class Stage:
    name: str  # DVC stage, params.yaml section, MLflow run name
    phase: str  # the module whose stage(params, tracker) does the work
    help: str  # the command's help text
    inputs: tuple[Path, ...]  # DVC outs of earlier stages it reads
    outs: tuple[Path, ...]  # what it writes (DVC outs; the first holds resolved_params.json)
    model: str | None = None  # the registered model it makes, if any
    data_parallel: bool = False  # KILN_NPROC > 1 runs it under torchrun
    checkpoints: bool = False  # resumes from data/checkpoints/<name> when re-run
    # inputs it reads through the training loaders: with KILN_DATA_REMOTE set they come
    # from object storage and need not be on local disk ("Data at scale")
    streamed: tuple[Path, ...] = ()
    # its first out is incremental: kept between runs (DVC ``persist``), never cleared
    # before one; the phase brings it up to date itself (ingest: intake/sync.py;
    # precompute_latents: phases/latent_cache.py)
    persist: bool = False
    # its first out holds the run's resolved_params.json. Not precompute_latents': its
    # rows are the same bytes whatever else the config says, and a copy of the whole
    # config in them would make an encode of unchanged rows retrain the U-Net
    records_config: bool = True

    @property
    def command(self) -> str:
        """The ``kiln`` subcommand (and dvc.yaml cmd) that runs it."""
        return self.name.replace("_", "-")


STAGES: tuple[Stage, ...] = (
    Stage(
        "ingest",
        "training.intake.ingest",
        "Stage 1: fetch a source with img2dataset into webdataset shards.",
        (),
        (P.RAW,),
        persist=True,
    ),
    Stage(
        "validate",
        "training.intake.validate",
        "Stage 2: Great Expectations gate; writes clean train/val shards and rejects.",
        (P.RAW,),
        # the report first, so resolved_params.json goes there too: data/clean holds
        # only train/ and val/, and its hash changes only with them (paths.VALIDATION)
        (P.VALIDATION, P.CLEAN, P.DOCS),
    ),
    Stage(
        "train_vae",
        "training.phases.vae",
        "Stage 3: train the AutoencoderKL; registers kiln-vae.",
        (P.CLEAN,),
        (P.VAE,),
        f"{PREFIX}kiln-vae",
        data_parallel=True,
        checkpoints=True,
        streamed=(P.CLEAN,),
    ),
    Stage(
        "train_clip",
        "training.phases.clip",
        "Stage 4: train the tokenizer and CLIPModel; registers kiln-clip.",
        (P.CLEAN,),
        (P.CLIP,),
        f"{PREFIX}kiln-clip",
        data_parallel=True,
        checkpoints=True,
        streamed=(P.CLEAN,),
    ),
    Stage(
        "precompute_latents",
        "training.phases.latents",
        "Stage 5: VAE posteriors + CLIP text states for every clean sample.",
        (P.CLEAN, P.VAE, P.CLIP),
        (P.LATENTS,),
        data_parallel=True,
        persist=True,
        records_config=False,
    ),
    Stage(
        "train_unet",
        "training.phases.unet",
        "Stage 6: train the conditional U-Net on the latents; registers kiln-unet.",
        (P.LATENTS, P.VAE),
        (P.UNET,),
        f"{PREFIX}kiln-unet",
        data_parallel=True,
        checkpoints=True,
        streamed=(P.LATENTS,),
    ),
    Stage(
        "train_controlnet",
        "training.phases.controlnet",
        "Stage 7: a ControlNet on the frozen U-Net, steered by edge maps; registers "
        "kiln-controlnet (train_controlnet.enabled; off by default).",
        (P.CLEAN, P.VAE, P.CLIP, P.UNET),
        (P.CONTROLNET,),
        f"{PREFIX}kiln-controlnet",
        data_parallel=True,
        checkpoints=True,
        streamed=(P.CLEAN,),
    ),
    Stage(
        "evaluate",
        "training.evaluation.evaluate",
        "Stage 8: sample the evaluation prompts, score them, register kiln-text2image.",
        (P.CLEAN, P.LATENTS, P.VAE, P.CLIP, P.UNET, P.CONTROLNET),
        (P.EVAL,),
        f"{PREFIX}kiln-text2image",
    ),
)
BY_NAME = {s.name: s for s in STAGES}

# DVC's probe of the ingest source: an ``always_changed`` stage before ingest (``kiln
# source``) that writes the source's fingerprint (``intake/ingest.py``,
# ``source_state``) to data/source.json, which ingest depends on. DVC re-runs ingest
# exactly when that file changes, i.e. when the data outside the repository changed.
# Not a row of the table: it has no params section, no MLflow run and makes no model.
SOURCE_PROBE = "source"
NAMES = tuple(BY_NAME)
MODEL_NAMES = {s.name: s.model for s in STAGES if s.model}
PIPELINE_MODEL = BY_NAME["evaluate"].model  # what users generate with and serve
