"""Aspect-ratio buckets: non-square images trained at their own shape, not cropped square.

The convention of NovelAI's SD fine-tunes, kohya-ss/sd-scripts and SimpleTuner: a set
of image sizes of about the same area (so a step costs about the same whatever its
bucket), each side a multiple of the model's stride; every image goes to the bucket
nearest its aspect ratio, is scaled to cover it and centre-cropped to it (losing a
sliver, not the sides of a wide picture); every batch draws from one bucket
(``order.BucketOrder``), so a batch is one tensor.

The sizes themselves are ``config.bucket_sizes`` (``Params.image_sizes``), where the
params that make them are checked against the models: a bucket's area is within 25 % of
``side**2``, its sides are multiples of ``stride`` and its aspect ratio is at most
``max_ratio``. At small sizes the stride is coarse: at 32 px with tiny's 16 px stride
the only such bucket is the square, so the tiny profile trains square crops; at 64 px
there are 64x64, 80x48, 48x80, 96x48 and 48x96.
"""

from __future__ import annotations

import io
import math

from PIL import Image


def nearest(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (on a log scale, so 2:1 and
    1:2 are equally far from square); a tie goes to the larger area, then the first."""
    r = math.log(width / height)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - r), -s[0] * s[1]))


def fit(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``img`` scaled to cover ``size`` (Lanczos, as img2dataset's downscaling) and
    centre-cropped to it."""
    w, h = size
    scale = max(w / img.width, h / img.height)
    sw, sh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    if (sw, sh) != img.size:
        img = img.resize((sw, sh), Image.Resampling.LANCZOS)
    left, top = (sw - w) // 2, (sh - h) // 2
    return img.crop((left, top, left + w, top + h))


def fit_png(data: bytes, sizes: list[tuple[int, int]]) -> tuple[bytes, tuple[int, int]]:
    """An encoded image fitted to its nearest bucket: (PNG bytes, bucket). Bytes already
    at a bucket's size and the nearest come back unchanged."""
    with Image.open(io.BytesIO(data)) as img:
        size = nearest(img.width, img.height, sizes)
        if img.size == size:
            return data, size
        out = io.BytesIO()
        fit(img.convert("RGB"), size).save(out, format="PNG")
        return out.getvalue(), size


def name(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def parse(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    return int(w), int(h)
