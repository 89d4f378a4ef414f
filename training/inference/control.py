"""Control images for the ControlNet: the detector, written once for training, evaluation,
``kiln generate --control`` and serving, so the maps a ControlNet sees at sampling time
are made exactly as the ones it learnt from.

The detector is Canny (OpenCV, which the stack already has for decoding): edges of the
grey picture, white on black, as three channels (the ``StableDiffusionControlNetPipeline``
convention: an RGB control image in [0, 1]). It needs no downloaded weights.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MIN_SIDE = 8  # a smaller control image has no spatial layout worth following
# The most pixels a control image may declare, checked from its header before it is
# decoded: it is only ever resized down to the sample (at most 4x the trained side), so
# this is generous (8192x8192, a 64 MP camera photo) yet keeps the decoded picture near
# 200 MB as RGB; Pillow's own bomb limit (~179 MP, ~850 MB decoded) is far too late.
MAX_PIXELS = 8192 * 8192
# beside a ControlNet's weights: its detector, thresholds and the U-Net it was trained on
CONTROL_FILE = "kiln_control.json"
MAX_SCALE = 10.0  # the largest conditioning scale kiln generate and the REST model take


class ControlImageError(ValueError):
    """A control image that cannot be used; the message says which and why."""


def edges(rgb: np.ndarray, low: int, high: int) -> np.ndarray:
    """Canny edges of a uint8 ``[H, W, 3]`` picture as a uint8 ``[H, W, 3]`` map (255 on
    an edge, 0 elsewhere)."""
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    e = cv2.Canny(grey, low, high)
    return np.repeat(e[..., None], 3, axis=2)


def _check_pixels(img: Image.Image, name: str) -> None:
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise ControlImageError(
            f"{name}: {w}x{h} pixels is too large a control image (at most {MAX_PIXELS:,} "
            "pixels, e.g. 8192x8192; it is resized to the sample's size anyway)"
        )


def open_control(source: str | Path | bytes | Image.Image, name: str | None = None) -> Image.Image:
    """A control image from a file, bytes or a picture, upright (its EXIF orientation
    applied, as ingest stores pictures), as RGB, or RGBA when it has transparency
    (``load_control`` lays it on the right background); a non-image, an empty file, one
    smaller than ``MIN_SIDE`` pixels or one declaring more than ``MAX_PIXELS`` (refused
    before decoding) is a ``ControlImageError`` naming it. Cheap: callers check before
    loading any model."""
    from PIL import ImageOps

    name = name or (str(source) if isinstance(source, (str, Path)) else "the control image")
    if isinstance(source, Image.Image):
        img = source
    else:
        data = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
        if not data:
            raise ControlImageError(f"{name}: empty file, not an image")
        try:
            img = Image.open(io.BytesIO(data))  # reads the header only
            _check_pixels(img, name)
            img.load()
        except UnidentifiedImageError:
            raise ControlImageError(f"{name}: not an image (Pillow cannot identify it)") from None
        except Image.DecompressionBombError:  # not an OSError: Pillow's limit, met first
            raise ControlImageError(
                f"{name}: declares more pixels than Pillow will decode (at most "
                f"{MAX_PIXELS:,} are taken)"
            ) from None
        except OSError as e:  # a truncated or damaged file of a known format
            raise ControlImageError(f"{name}: not an image Pillow can read ({e})") from None
    _check_pixels(img, name)  # a picture handed in already decoded: bounded all the same
    # a phone photo stores its pixels sideways and says so in EXIF: was drawn rotated
    img = ImageOps.exif_transpose(img)
    if min(img.size) < MIN_SIDE:
        raise ControlImageError(
            f"{name}: {img.size[0]}x{img.size[1]} pixels, too small to carry a layout "
            f"(at least {MIN_SIDE}x{MIN_SIDE})"
        )
    if img.mode in ("RGBA", "LA", "PA", "P") or "transparency" in img.info:
        return img.convert("RGBA")
    if img.mode.startswith("I"):  # 16-bit grey (I;16*; older Pillows and TIFFs: I)
        # Pillow's convert("RGB") clips these to 255, so nearly every pixel of a 16-bit
        # picture came out white and Canny found no edge: the answer was silently the
        # base model's. 0..65535 is scaled to 0..255 instead (65535 / 257 = 255).
        values = np.asarray(img, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 65535:  # mode I is 32-bit: clipped, its picture was lost
            raise ControlImageError(
                f"{name}: a 32-bit integer picture with values {low:g}..{high:g}; save it "
                "as a 16-bit (0..65535) or 8-bit picture"
            )
        img = Image.fromarray(np.rint(values / 257.0).astype(np.uint8), "L")
    elif img.mode == "F":  # 32-bit float grey (TIFF, depth and edge maps saved by numpy)
        img = Image.fromarray(_float_to_grey(np.asarray(img, dtype=np.float64), name), "L")
    return img.convert("RGB")


def _float_to_grey(values: np.ndarray, name: str) -> np.ndarray:
    """A float picture in 0..255: Pillow's convert("RGB") clips it as it is, so the
    float convention's 0..1 came out all black but for the exact 1.0s (no edge, the base
    model's answer). 0..1 is scaled by 255, 0..255 kept; any other range is refused
    rather than guessed at (a depth map in metres has no one right grey)."""
    if not np.isfinite(values).all():
        raise ControlImageError(f"{name}: a float picture with NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 255:
        raise ControlImageError(
            f"{name}: a float picture with values {low:g}..{high:g}; save it in 0..1 or "
            "0..255 (or as an 8- or 16-bit picture)"
        )
    scaled = values * 255.0 if high <= 1.0 else values
    return np.rint(scaled).astype(np.uint8)


def load_control(
    source: str | Path | bytes | Image.Image,
    size: tuple[int, int],
    is_map: bool,
    low: int,
    high: int,
    name: str | None = None,
    background: str = "#ffffff",
) -> tuple[Image.Image, list[str]]:
    """The control image for a ``(width, height)`` sample (``open_control``'s checks):
    edges of it (``is_map=False``), or the map made 0/255 as the ControlNet learnt maps
    (``resize_map``; was: a map at the sample's size went in as given, a grey or red
    line or a JPEG's noise included, at any other size binarised). A picture of another
    size is resized first (edges are taken at the size they were learnt at) and a note
    says so. Transparency lies on ``background`` for a picture (the ControlNet learnt
    from pictures that ingest laid on ``ingest.background``: ``CONTROL_FILE``'s
    ``background``), on black for a map (was: black for both, and a dark drawing on a
    transparent background gave no edge at all)."""
    name = name or (str(source) if isinstance(source, (str, Path)) else "the control image")
    img, notes = open_control(source, name), []
    if img.mode == "RGBA":
        under = (0, 0, 0) if is_map else tuple(bytes.fromhex(background.lstrip("#")))
        img = Image.alpha_composite(Image.new("RGBA", img.size, (*under, 255)), img)
        img = img.convert("RGB")
    if img.size != size:
        notes.append(
            f"{name}: {img.size[0]}x{img.size[1]} resized to {size[0]}x{size[1]}, the sample's size"
        )
        if not is_map:
            img = img.resize(size, Image.Resampling.BILINEAR)
    if is_map:
        return resize_map(img, size), notes
    return Image.fromarray(edges(np.asarray(img), low, high)), notes


def resize_map(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A ready edge map at ``(width, height)``, 0/255 again: an output pixel is an edge
    when any input pixel it covers is one (its brightest channel at least 128).

    The ControlNet learnt only from Canny maps, 0 or 255. A bilinear resize spread a
    1-px line over its neighbours as faint greys (40-56/255 at a 4x downscale), a
    map it never saw, so the control barely steered. A box maximum keeps every line
    (downscaling) and, where output pixels are smaller than input ones, is nearest
    neighbour (upscaling); the threshold at half white then makes it binary without
    turning a JPEG's near-black ringing into edges."""
    a = np.asarray(img.convert("RGB")).max(axis=2)  # a line of any colour is an edge
    for axis, n in ((0, size[1]), (1, size[0])):
        starts = (np.arange(n) * a.shape[axis]) // n  # each output pixel's first input
        # maximum.reduceat: max over [starts[i], starts[i + 1]); a repeated start (an
        # upscale) gives that one input pixel
        a = np.maximum.reduceat(a, starts, axis=axis)
    e = np.where(a >= 128, 255, 0).astype(np.uint8)
    return Image.fromarray(np.repeat(e[..., None], 3, axis=2))


def with_controlnet(pipe, controlnet):
    """``pipe`` (an SD pipeline) with ``controlnet``: the standard
    ``StableDiffusionControlNetPipeline`` sharing its components; with ``controlnet``
    None, the plain ``StableDiffusionPipeline`` of them (a ControlNet pipeline's base
    model, which draws without a control image)."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

    parts = {
        "vae": pipe.vae,
        "text_encoder": pipe.text_encoder,
        "tokenizer": pipe.tokenizer,
        "unet": pipe.unet,
        "scheduler": pipe.scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    if controlnet is None:
        out = StableDiffusionPipeline(**parts)
    else:
        out = StableDiffusionControlNetPipeline(**parts, controlnet=controlnet)
    out.set_progress_bar_config(disable=True)
    return out


def weights_fingerprint(model_dir: str | Path) -> str:
    """A hash of a model folder's tensors (names and values, not file layout): tells
    whether a ControlNet was trained on the U-Net a pipeline carries."""
    import hashlib

    from safetensors import safe_open

    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="np") as st:
            for k in sorted(st.keys()):
                h.update(k.encode())
                h.update(np.ascontiguousarray(st.get_tensor(k)).tobytes())
    return h.hexdigest()[:16]


def detector(cn_dir: str | Path) -> dict:
    """The detector settings a ControlNet was trained with (``CONTROL_FILE``)."""
    import json

    return json.loads((Path(cn_dir) / CONTROL_FILE).read_text())


def own_scale(det: dict) -> float:
    """The conditioning scale a ControlNet's stage evaluated it at (``CONTROL_FILE``'s
    ``conditioning_scale``, ``train_controlnet.conditioning_scale``): what ``kiln
    generate`` and the REST model use when the caller gives none, so users get the
    scale the reported control scores are for. A file written before it was recorded:
    1.0, the scale those stages evaluated at. ``ValueError`` for a value that is not a
    finite number >= 0 (what the config allows)."""
    import math

    s = det.get("conditioning_scale", 1.0)
    if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s) or s < 0:
        raise ValueError(f"{CONTROL_FILE}: conditioning_scale must be a number >= 0, got {s!r}")
    return float(s)


def attach(pipe, cn_dir: str | Path) -> tuple:
    """(``pipe`` with the ControlNet in ``cn_dir``, on ``pipe``'s device, the detector
    settings it was trained with): what ``kiln generate --control`` and the REST model
    sample with."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_pretrained(cn_dir, use_safetensors=True).eval().to(pipe.device)
    return with_controlnet(pipe, net), detector(cn_dir)


def ship(cn_dir: Path | None, unet_dir: Path, dest: Path) -> str:
    """Copy the ControlNet at ``cn_dir`` to ``dest`` when it was trained on the U-Net in
    ``unet_dir`` (so a pipeline made of that U-Net carries it, and the registered model
    serves control images); ``dest`` is removed otherwise. Says what it did, in a line."""
    import shutil

    shutil.rmtree(dest, ignore_errors=True)
    if cn_dir is None or not (Path(cn_dir) / "config.json").is_file():
        return "no ControlNet trained (train_controlnet.enabled is false)"
    trained_on = detector(cn_dir).get("unet")
    if trained_on != weights_fingerprint(unet_dir):
        return f"the ControlNet in {cn_dir} was trained on another U-Net: not shipped"
    shutil.copytree(cn_dir, dest, ignore=shutil.ignore_patterns("previews"))
    return f"the ControlNet ({cn_dir}) ships with the pipeline"
