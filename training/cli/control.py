"""``kiln generate --control`` and ``kiln export --controlnet``: finding the ControlNet,
checking the control picture before any model loads, and the ControlNet pipeline; a
``StableDiffusionControlNetPipeline`` directory (what ``kiln export --controlnet``
writes) as ``kiln generate --model``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from training.cli.base import UserError

if TYPE_CHECKING:
    from diffusers import (
        ControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
    )
    from PIL import Image


def controlnet_dir(model: str, pipe_dir: Path) -> Path:
    """The ControlNet folder a path or ``models:/kiln-controlnet/N`` names, for the
    pipeline at ``pipe_dir`` (refused when that pipeline's denoiser is a DiT)."""
    index = pipe_dir / "model_index.json"  # what the pipeline is, not which folders lie there
    if index.is_file() and json.loads(index.read_text()).get("transformer"):
        raise UserError(
            f"the pipeline at {pipe_dir} has a DiT; a Kiln ControlNet steers a U-Net "
            "(train_unet.backbone unet2d)"
        )
    p = Path(model).expanduser()
    if not p.exists() and model.startswith("models:/"):
        from training import tracking

        try:
            p = tracking.resolve_model_dir(f"models:/{tracking.model_version(model)}")
        except Exception as exc:
            raise UserError(f"cannot resolve ControlNet {model!r}: {exc}") from None
    if (p / "MLmodel").is_file() and (p / "model").is_dir():
        p = p / "model"
    if not (p / "config.json").is_file():
        why = "train one: train_controlnet.enabled: true (README, ControlNet)"
        if (p / "skipped.json").is_file():
            note = json.loads((p / "skipped.json").read_text())
            why = f"its stage was skipped: {note['skipped']}"
        raise UserError(f"no ControlNet at {p}: {why}")
    return p


def own_controlnet(pipe_dir: Path) -> Path | None:
    """The ControlNet a ``StableDiffusionControlNetPipeline`` directory carries as its
    ``controlnet/`` component (``kiln export --controlnet`` writes one), else None."""
    try:
        index = json.loads((pipe_dir / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {pipe_dir / 'model_index.json'}: {exc}") from None
    net = pipe_dir / "controlnet"
    return net if index.get("controlnet") and (net / "config.json").is_file() else None


def base_pipeline(pipe: StableDiffusionControlNetPipeline) -> StableDiffusionPipeline:
    """The ``StableDiffusionPipeline`` of a ControlNet pipeline's own VAE, text encoder,
    tokenizer, U-Net and scheduler (the same modules, not copies): the base model, which
    draws without a control image; the ControlNet pipeline itself needs one."""
    from training.inference.control import with_controlnet

    return with_controlnet(pipe, None)


def _detector(cn_dir: Path) -> dict:
    """The detector settings beside the ControlNet; a ControlNet without them (exported
    by a Kiln that did not copy them, or made elsewhere) gets train_controlnet's
    defaults, with a warning, rather than a crash."""
    from training.inference.control import CONTROL_FILE, detector
    from training.sections import ControlNetCfg

    if (cn_dir / CONTROL_FILE).is_file():
        return detector(cn_dir)
    fields = ControlNetCfg.model_fields
    low, high = fields["canny_low"].default, fields["canny_high"].default
    typer.echo(
        f"kiln: warning: {cn_dir} has no {CONTROL_FILE} (the edge detector it was trained "
        f"with): Canny {low}/{high}, train_controlnet's defaults, and no check that it was "
        "trained on this U-Net",
        err=True,
    )
    return {"detector": "canny", "canny_low": low, "canny_high": high}


def open_control(path: Path):
    """The control picture, checked before any model loads."""
    from training.inference.control import ControlImageError
    from training.inference.control import open_control as open_checked

    try:
        return open_checked(path)
    except (ControlImageError, OSError) as exc:
        raise UserError(str(exc)) from None


@dataclass(frozen=True)
class Control:
    """``kiln generate --control``, resolved before any model loads: the ControlNet (as
    the manifest names it, and its folder), the control picture (its path, opened and
    checked), the detector it was trained with and the conditioning scale to draw at."""

    name: str
    folder: Path
    path: Path
    picture: Image.Image
    detector: dict
    scale: float


def find_control(
    path: Path, asked: str, pipe_dir: Path, own_net_dir: Path | None, scale: float | None
) -> Control:
    """The ControlNet ``asked`` names, else the one inside ``--model``'s directory (a
    ControlNet pipeline: ``own_net_dir``), else the one evaluate shipped beside the
    pipeline, else the project's; with ``scale`` None, the scale its stage evaluated it
    at (``own_scale``), so the picture is the one its reported scores are for. A
    ControlNet trained on another U-Net than the pipeline's is named in a warning."""
    from training import paths as P
    from training.inference.control import own_scale

    if own_net_dir is not None and not asked:  # the directory's own
        asked = str(own_net_dir)
    elif not asked:  # evaluate ships the ControlNet it scored beside the pipeline
        shipped = pipe_dir.parent / P.SHIPPED_CONTROLNET
        asked = str(shipped if (shipped / "config.json").is_file() else P.CONTROLNET)
    folder = controlnet_dir(asked, pipe_dir)
    picture = open_control(path)
    det = _detector(folder)
    if scale is None:
        try:
            scale = own_scale(det)
        except ValueError as exc:
            raise UserError(f"{folder}: {exc}; pass --control-scale") from None
    if trained_on_other_unet(folder, pipe_dir):
        typer.echo(
            f"kiln: warning: the ControlNet at {folder} was trained on another U-Net than "
            f"the pipeline's ({pipe_dir}); its control may not hold",
            err=True,
        )
    return Control(asked, folder, path, picture, det, scale)


def with_control(pipe, c: Control, size, is_map: bool, net: ControlNetModel | None = None):
    """(the ControlNet pipeline around ``pipe``, (the control image, its scale)): the
    picture made into the map the ControlNet learnt from (its detector and thresholds).
    ``net``: the ControlNet of ``c.folder`` already loaded (a ControlNet pipeline
    directory's own), so it is not read twice."""
    from training.inference.control import attach, load_control, with_controlnet

    low, high = c.detector["canny_low"], c.detector["canny_high"]
    image, notes = load_control(
        c.picture, size, is_map, low, high, name=str(c.path),
        background=c.detector.get("background", "#ffffff"),
    )  # fmt: skip
    for note in notes:
        typer.echo(f"kiln: note: {note}", err=True)
    steered = attach(pipe, c.folder)[0] if net is None else with_controlnet(pipe, net)
    return steered, (image, c.scale)


def trained_on_other_unet(cn_dir: Path, pipe_dir: Path) -> bool:
    """Whether the ControlNet's ``kiln_control.json`` names a U-Net other than the one in
    ``pipe_dir`` (its weights' fingerprint). A ControlNet without the file cannot be
    checked: False (``_detector`` warns about it)."""
    from training.inference.control import CONTROL_FILE, detector, weights_fingerprint

    if not (cn_dir / CONTROL_FILE).is_file():
        return False
    trained_on = detector(cn_dir).get("unet")
    return bool(trained_on) and trained_on != weights_fingerprint(pipe_dir / "unet")


def export_controlnet(asked: str | None, pipe_dir: Path) -> Path | None:
    """``kiln export --controlnet``'s folder (None without one), refused when that
    ControlNet was trained on another U-Net than the pipeline's. Its residuals were
    learnt for that U-Net's features, and the export is a folder others load as one
    model, without ``kiln generate``'s warning (the gate may have kept an older champion
    than the U-Net the ControlNet stage trained on)."""
    if not asked:
        return None
    cn_dir = controlnet_dir(asked, pipe_dir)
    if trained_on_other_unet(cn_dir, pipe_dir):
        raise UserError(
            f"the ControlNet at {cn_dir} was trained on another U-Net than the pipeline's "
            f"({pipe_dir}); its control would not hold. Export the version it was trained "
            "on (--model), or train the ControlNet on this one"
        )
    return cn_dir


def copy_kiln_files(pipe_dir: Path, cn_dir: Path | None, out: Path) -> None:
    """After ``save_pretrained``: the files diffusers does not write that Kiln's callers
    read: the model's chosen sampler (``kiln_sampler.json``) and the ControlNet's edge
    detector and the U-Net it was trained on (``kiln_control.json``, for ``kiln generate
    --model OUT --control``), from ``--controlnet``'s folder, else ``--model``'s own."""
    import shutil

    from training.inference.control import CONTROL_FILE
    from training.inference.defaults import SAMPLER_FILE

    if (pipe_dir / SAMPLER_FILE).is_file():
        shutil.copy2(pipe_dir / SAMPLER_FILE, out / SAMPLER_FILE)
    source = cn_dir or own_controlnet(pipe_dir)
    if source is not None and (source / CONTROL_FILE).is_file():
        shutil.copy2(source / CONTROL_FILE, out / "controlnet" / CONTROL_FILE)
