"""``kiln generate --control`` and ``kiln export --controlnet``: finding the ControlNet,
checking the control picture before any model loads, and the ControlNet pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from training.cli.base import UserError


def controlnet_dir(model: str, pipe_dir: Path) -> Path:
    """The ControlNet folder a path or ``models:/kiln-controlnet/N`` names, for the
    pipeline at ``pipe_dir`` (refused when that pipeline's denoiser is a DiT)."""
    if (pipe_dir / "transformer").is_dir():
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


def open_control(path: Path):
    """The control picture, checked before any model loads."""
    from training.inference.control import ControlImageError
    from training.inference.control import open_control as open_checked

    try:
        return open_checked(path)
    except (ControlImageError, OSError) as exc:
        raise UserError(str(exc)) from None


def with_control(pipe, pipe_dir: Path, cn_dir: Path, control: tuple, size, is_map: bool):
    """(the ControlNet pipeline around ``pipe``, the control image): ``control`` = (its
    path, the opened picture), made into the map the ControlNet learnt from (its
    detector and thresholds); a ControlNet trained on another U-Net than the
    pipeline's is named in a warning."""
    from training.inference.control import attach, detector, load_control, weights_fingerprint

    det = detector(cn_dir)
    path, picture = control
    low, high = det["canny_low"], det["canny_high"]
    image, notes = load_control(picture, size, is_map, low, high, name=str(path))
    for note in notes:
        typer.echo(f"kiln: note: {note}", err=True)
    if det.get("unet") and det["unet"] != weights_fingerprint(pipe_dir / "unet"):
        typer.echo(
            f"kiln: warning: the ControlNet at {cn_dir} was trained on another U-Net than "
            f"the pipeline's ({pipe_dir}); its control may not hold",
            err=True,
        )
    return attach(pipe, cn_dir)[0], image
