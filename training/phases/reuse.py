"""Reuse a registered VAE or CLIP instead of training one (continuous training).

A new VAE is a new latent space: every latent has to be encoded again, and a U-Net
trained on the old one is worthless. A new CLIP is a new text space, with the same
consequence. So a pipeline that builds on what it has keeps its components:
``train_vae.reuse`` and ``train_clip.reuse`` name a model to install in place of
training one:

- ``models:/kiln-vae@champion`` (an alias) or ``models:/kiln-vae/3`` (a version);
- a directory holding a diffusers ``AutoencoderKL`` (or a transformers ``CLIPModel``
  with its tokenizer) that a user brings.

The stage copies it into its output after checking, before anything else, that it is
that kind of model and fits the profile, then measures it on this data's val split
(the phase's own metrics), so a reused model is still graded on the data it now serves.
A registry version is not registered again: the stage's ``registered_version`` is the
version reused (``reused_version``).

``train_unet.init_from`` (same forms) starts the U-Net from a registered one instead of
a fresh initialisation (``warm_start``): it then trains ``train_unet.steps`` on all of
the current data, old samples and new (the replay is the data itself), and registers a
new version whose metrics name its parent (``init_from``, ``init_version``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from training.config import Params

# stage -> (weights file, what config.json must say, the class it loads as)
KINDS = {
    "train_vae": ("diffusion_pytorch_model.safetensors", ("_class_name", "AutoencoderKL")),
    "train_clip": ("model.safetensors", ("model_type", "clip")),
}
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
# files of a registered folder that describe the registration, not the model. Its
# resolved_params.json is copied: the config that made these weights, in place of this
# run's (logged with this run in MLflow). Was: this run's, so a continuing run whose
# train_vae settings changed reinstalled the same VAE as an output of other bytes, and
# DVC fine-tuned the U-Net again on unchanged data and registered it.
NOT_COPIED = ("MLmodel",)
# beside a U-Net's weights: the fingerprints (``latent_cache.model_fingerprint``) of the
# VAE and CLIP whose latents and text states it was trained on
TRAINED_ON = "kiln_trained_on.json"


class ReuseError(ValueError):
    """The model to reuse cannot be: not found, not that kind, or not this profile's."""


# the param that names what each stage builds on
BUILDS_ON = {"train_vae": "reuse", "train_clip": "reuse", "train_unet": "init_from"}


def builds_on(stage: str, params: Params) -> str | None:
    """The model ``stage`` starts from: the one its param names; else, in ``mode:
    continue``, the champion's component (``models:/kiln-vae@champion``: crowned
    with the champion pipeline, ``tracking/components.py``); else None, from scratch.
    With no champion yet a continuing run trains from scratch and says so. Raises
    ``ConnectionError`` when the registry cannot be reached (never "no champion")."""
    named = getattr(getattr(params, stage), BUILDS_ON[stage])
    if named or params.mode == "scratch":
        return named
    from training import engine as E
    from training.stages import BY_NAME, PIPELINE_MODEL
    from training.tracking import components

    champion = components.champion(PIPELINE_MODEL)
    if champion is None:
        E.say(f"{stage}: mode continue, but {PIPELINE_MODEL} has no @champion yet: from scratch")
        return None
    return f"models:/{BY_NAME[stage].model}@champion"


def resolve(ref: str) -> tuple[Path, str | None]:
    """(local directory, ``name/version`` or None for a plain directory) of ``ref``.
    Raises ``ReuseError`` for what does not exist and ``ConnectionError`` when the
    registry cannot be reached (a retry may help)."""
    if not ref.startswith("models:/"):
        path = Path(ref)
        if not path.is_dir():
            raise ReuseError(f"{ref} is not a directory (nor a models:/ registry URI)")
        return path, None
    from training.tracking import components

    try:
        return components.fetch(ref)
    except LookupError as exc:
        raise ReuseError(str(exc)) from None


def check_named(params: Params) -> None:
    """In ``mode: scratch``, every model a param names (``train_vae.reuse``,
    ``train_clip.reuse``, ``train_unet.init_from``) exists, and the VAE and CLIP are the
    kind the profile can use: the pipeline's preflight calls it before any stage. Was: a
    misspelled ``models:/kiln-unet@champon`` stopped train_unet after ingest, validate,
    the VAE, CLIP and the latents. (``mode: continue`` checks them in
    ``continuing.preflight``.) Raises ``ReuseError`` or ``ConnectionError``."""
    for stage, key in BUILDS_ON.items():
        ref = getattr(getattr(params, stage), key)
        if not ref:
            continue
        directory, _ = resolve(ref)
        if stage != "train_unet":
            check(stage, ref, directory, params)


def _config(ref: str, directory: Path, weights: str, what: str) -> dict:
    """A model folder's config.json, once its weights and config are known to be there."""
    cfg_path = directory / "config.json"
    if not (directory / weights).is_file() or not cfg_path.is_file():
        raise ReuseError(f"{ref}: no {weights} and config.json: not {what} folder")
    return json.loads(cfg_path.read_text())


def check(stage: str, ref: str, directory: Path, params: Params) -> None:
    """That ``directory`` holds the stage's kind of model, and one the profile can use."""
    weights, (key, value) = KINDS[stage]
    cfg = _config(ref, directory, weights, f"a {value}")
    if cfg.get(key) != value:
        raise ReuseError(f"{ref}: config.json says {key} {cfg.get(key)!r}, not {value!r}")
    if stage == "train_vae":
        if cfg.get("shift_factor"):  # SD3-style VAEs: latents are (z - shift) * scale
            raise ReuseError(
                f"{ref}: the VAE has shift_factor {cfg['shift_factor']}; Kiln trains its "
                "denoisers on scaled latents without a shift (the DiT's pipeline would "
                "decode every sample shifted): reuse a VAE without one"
            )
        down = 2 ** (len(cfg["block_out_channels"]) - 1)
        want = 2 ** (len(params.train_vae.block_out_channels) - 1)
        if down != want:
            raise ReuseError(
                f"{ref}: the VAE downsamples {down}x, the {params.profile} profile's "
                f"{want}x (its buckets and U-Net sizes assume {want}x); reuse a VAE "
                "trained for this profile"
            )
    else:
        side = cfg["vision_config"]["image_size"]
        if side != params.ingest.image_size:
            raise ReuseError(
                f"{ref}: the CLIP sees {side} px images, this run's are "
                f"{params.ingest.image_size} px (ingest.image_size); reuse a CLIP trained "
                "at that size, or train a new one (mode: scratch)"
            )
        if not (directory / "tokenizer_config.json").is_file():
            raise ReuseError(f"{ref}: no tokenizer beside the CLIP model")


def check_reused(stage: str, params: Params) -> None:
    """The model ``stage`` (train_vae, train_clip) would install (``builds_on``) is
    there and fits, checked before the stage adapter clears its output: a refused
    reuse leaves the last model as it was (``install`` checks again)."""
    ref = builds_on(stage, params)
    if ref:
        check(stage, ref, resolve(ref)[0], params)


def install(stage: str, ref: str, out_dir: Path, params: Params) -> dict:
    """Copy the model ``ref`` names into ``out_dir`` (checked first); returns the
    metrics that say what was reused."""
    directory, version = resolve(ref)
    check(stage, ref, directory, params)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(directory.iterdir()):
        if f.is_file() and f.name not in NOT_COPIED:
            shutil.copy2(f, out_dir / f.name)
    from training import engine as E

    E.say(f"{stage}: reusing {ref}" + (f" (= models:/{version})" if version else ""))
    return {"reused_from": ref, "reused_version": version.split("/")[1] if version else ""}


def fits(ref: str, params: Params, own: dict[str, list], theirs: dict[str, list]) -> None:
    """Raise ``ReuseError`` unless two U-Nets' tensors (name -> shape) match one for one."""
    differ = sorted(k for k in own.keys() | theirs.keys() if own.get(k) != theirs.get(k))
    if differ:
        k = differ[0]
        raise ReuseError(
            f"{ref} does not fit the {params.profile} profile's U-Net: {len(differ)} "
            f"tensors differ, e.g. {k}: {theirs.get(k, 'missing')} there, "
            f"{own.get(k, 'missing')} here (a changed width, latent or text size, "
            "or attention layout: plain_levels); "
            "train this one from scratch (mode: scratch)"
        )


# a config.json key (beside the "_" ones: class, library version) that says nothing
# about what the network computes: the image size a pipeline defaults to
_NOT_COMPUTED = ("sample_size",)


def same_config(ref: str, directory: Path, model) -> None:
    """``ReuseError`` unless the denoiser in ``directory`` was built with ``model``'s
    settings (its ``config.json`` against ``model.config``, the keys both have). The
    tensors' shapes cannot tell: heads (``attention_head_dim``, ``dit_heads``) or norm
    groups split the same weights another way, so the parent would be loaded into a
    network that computes something else and fine-tuned on a quarter of the steps as
    if it knew the task."""
    saved = json.loads((directory / "config.json").read_text())
    ours = json.loads(json.dumps(dict(model.config)))  # tuples as the file has them
    differ = sorted(
        k for k in saved.keys() & ours.keys()
        if not k.startswith("_") and k not in _NOT_COMPUTED and saved[k] != ours[k]
    )  # fmt: skip
    if differ:
        shown = ", ".join(f"{k} {saved[k]!r} there, {ours[k]!r} here" for k in differ)
        raise ReuseError(
            f"{ref} was built with other settings ({shown}): the same tensors compute "
            "something else; set them back, or train this one from scratch (mode: "
            "scratch, no init_from)"
        )


# what a denoiser learnt to predict and along which noise schedule: the same tensors
# trained on another objective predict something else at every step
_OBJECTIVE_KEYS = (
    "_class_name",
    "prediction_type",
    "beta_schedule",
    "num_train_timesteps",
    "shift",
)


def same_objective(ref: str, directory: Path, ours: dict) -> None:
    """``ReuseError`` unless the U-Net in ``directory`` was trained on the noise
    schedule and prediction target this run trains (its ``scheduler_config.json``
    against ``ours``, ``unet.objective(params)``). The tensors' shapes cannot tell: a
    v-prediction U-Net fits an epsilon one tensor for tensor, and warm-started it would
    be fine-tuned on a quarter of the steps as if it knew the task. A U-Net saved
    without the file is not checked."""
    saved = directory / "scheduler_config.json"
    if not saved.is_file():
        return
    theirs = json.loads(saved.read_text())
    differ = [k for k in _OBJECTIVE_KEYS if k in theirs and k in ours and theirs[k] != ours[k]]
    if differ:
        shown = ", ".join(f"{k} {theirs[k]!r} there, {ours[k]!r} here" for k in differ)
        raise ReuseError(
            f"{ref} was trained on another objective ({shown}); train this one from "
            "scratch (mode: scratch, no init_from) or set train_unet back"
        )


def same_spaces(ref: str, directory: Path, ours: dict[str, str]) -> None:
    """``ReuseError`` unless the U-Net in ``directory`` was trained on latents of the
    VAE and text states of the CLIP that ``ours`` fingerprints (``TRAINED_ON``). A new
    VAE is a new latent space and a new CLIP a new text space with the same shapes: a
    U-Net warm-started across either would fine-tune weights that predict for a space
    this run does not have, and pass every shape check. A U-Net saved without the file
    (before Kiln wrote it), or a space this run cannot name, is not checked."""
    saved = directory / TRAINED_ON
    if not saved.is_file():
        return
    theirs = json.loads(saved.read_text())
    differ = [k for k in ("vae", "clip") if theirs.get(k) and ours.get(k, theirs[k]) != theirs[k]]
    if differ:
        shown = ", ".join(f"{k.upper()} {theirs[k]} there, {ours.get(k)} here" for k in differ)
        raise ReuseError(
            f"{ref} was trained in another latent or text space ({shown}); fine-tune it "
            "only with the models it was trained with (mode: continue installs the "
            "champion's; or train_vae.reuse / train_clip.reuse) or train the U-Net from "
            "scratch (no init_from)"
        )


def check_trained_on(unet_dir: Path, models: dict[str, Path]) -> None:
    """``UserError`` unless the denoiser in ``unet_dir`` was trained on the latents and
    text states of the VAE and CLIP folders in ``models`` ("vae", "clip"; its
    ``TRAINED_ON``), for a stage that pairs them. Was: ``kiln train-vae`` after a VAE
    edit, then ``kiln evaluate``, assembled and registered the old U-Net with the new
    VAE (other latents, the same shapes), scored as this run's model."""
    from training.errors import UserError
    from training.phases.latent_cache import model_fingerprint

    saved = unet_dir / TRAINED_ON
    theirs = json.loads(saved.read_text()) if saved.is_file() else {}  # older: unchecked
    differ = [
        f"{k.upper()} {theirs[k]} there, {ours} in {d}"
        for k, d in models.items()
        if theirs.get(k) and theirs[k] != (ours := model_fingerprint(d))
    ]
    if differ:
        raise UserError(
            f"{unet_dir} was trained on the latents of other models ({'; '.join(differ)}): "
            "run precompute_latents and train_unet again (dvc repro, or kiln run)"
        )


def warm_start(model, ref: str, params: Params, objective: dict, spaces: dict[str, str]) -> dict:
    """``train_unet.init_from``: load the U-Net ``ref`` names into ``model``, the
    profile's freshly built denoiser, before any step. It must be the same architecture
    tensor for tensor (a champion trained at other widths or on another latent or text
    size cannot be continued: train from scratch), trained on ``objective`` (the
    training scheduler's config, ``same_objective``) in the latent and text spaces that
    ``spaces`` fingerprints (``same_spaces``). Returns the metrics that say where training
    started from."""
    import torch
    from safetensors.torch import load_file

    directory, version = resolve(ref)
    cls = _config(ref, directory, UNET_WEIGHTS, "a U-Net").get("_class_name")
    if cls != type(model).__name__:
        raise ReuseError(
            f"{ref}: a {cls}, but the {params.train_unet.backbone} backbone is a "
            f"{type(model).__name__}"
        )
    same_objective(ref, directory, objective)
    same_spaces(ref, directory, spaces)
    state = load_file(directory / UNET_WEIGHTS)
    fits(ref, params, {k: list(v.shape) for k, v in model.state_dict().items()},
         {k: list(v.shape) for k, v in state.items()})  # fmt: skip
    same_config(ref, directory, model)
    with torch.no_grad():
        model.load_state_dict(state)
    from training import engine as E

    E.say(f"train_unet: starting from {ref}" + (f" (= models:/{version})" if version else ""))
    from training.phases.latent_cache import model_fingerprint

    return {
        "init_from": ref,
        "init_version": version.split("/")[1] if version else "",
        # which weights, whatever the reference (an alias moves, a folder is rewritten):
        # an interrupted fine-tune resumes only onto the parent it started from
        "init_fingerprint": model_fingerprint(directory),
    }
