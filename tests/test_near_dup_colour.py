"""The near-duplicate hash on saturated clip art: a PNG and a JPEG copy of one drawing
are near, the same drawing in another colour and other drawings are not.

The old hash (per RGB channel, any brighter cell set a bit) put JPEG copies (quality 75
and 90) of a red circle on white 25 and 21 bits from its PNG and of a blue star 16 and
13, past the default 6, because flat fields sat on ties that JPEG's noise broke; and a
blue circle 1 bit from a purple one and a red one 2 from a green one, because a channel
that is flat across an edge carries no colour."""

import io
import math
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, ImageDraw

from training import config
from training.intake import checks, shards, validate
from training.intake.builtin import PALETTE

BITS = config.resolve({}).validate_.near_duplicate_bits  # the default, 6
# the built-in shapes' flat palette (white aside: this clip art is drawn on white)
COLOURS = {name: rgb for name, rgb in PALETTE.items() if name != "white"} | {"black": (0, 0, 0)}


def _circle(colour: str) -> Image.Image:
    img = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(img).ellipse([12, 12, 52, 52], fill=COLOURS[colour])
    return img


def _star() -> Image.Image:
    img = Image.new("RGB", (64, 64), "white")
    points = []
    for k in range(10):  # five points: outer radius 28, inner 12
        r, a = (28 if k % 2 == 0 else 12), math.pi / 2 + k * math.pi / 5
        points.append((32 + r * math.cos(a), 32 - r * math.sin(a)))
    ImageDraw.Draw(img).polygon(points, fill=COLOURS["blue"])
    return img


def _strokes() -> Image.Image:
    """Green text-like strokes: three slanted bars and a crossbar."""
    img = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(img)
    for x in (8, 26, 44):
        draw.line([(x, 10), (x + 10, 54)], fill=COLOURS["green"], width=5)
    draw.line([(6, 32), (58, 32)], fill=COLOURS["green"], width=5)
    return img


DRAWINGS = {"red circle": lambda: _circle("red"), "blue star": _star, "strokes": _strokes}


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)  # JPEG: PIL's default 4:2:0 chroma subsampling
    return buf.getvalue()


def _hash(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as img:
        return checks.dhash(img.convert("RGB"))


@pytest.mark.parametrize("quality", [75, 90])
@pytest.mark.parametrize("name", sorted(DRAWINGS))
def test_a_jpeg_copy_of_saturated_clip_art_is_near_its_png(name: str, quality: int):
    img = DRAWINGS[name]()
    png = _hash(_encoded(img, "PNG"))
    jpeg = _hash(_encoded(img, "JPEG", quality=quality))
    assert png.bit_count() >= checks.MIN_HASH_BITS  # not "flat": the near check applies
    assert (png ^ jpeg).bit_count() <= BITS


def test_other_colours_and_other_drawings_stay_apart():
    pictures = {f"{c} circle": _circle(c) for c in COLOURS} | {
        "blue star": _star(),
        "strokes": _strokes(),
    }
    hashes = {name: _hash(_encoded(img, "PNG")) for name, img in pictures.items()}
    names = sorted(hashes)
    near = [
        (a, b, (hashes[a] ^ hashes[b]).bit_count())
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if (hashes[a] ^ hashes[b]).bit_count() <= BITS
    ]
    assert near == []


def test_validate_drops_the_jpeg_copy_and_keeps_the_other_colours(tmp_path: Path):
    """End to end: the JPEG copy goes as a near-duplicate of its PNG, beside it on the
    pairs page; the same circle in the other colours and the other drawings all stay."""
    raw = tmp_path / "raw"
    pictures = {f"{c}-circle": _circle(c) for c in COLOURS} | {
        "blue-star": _star(),
        "strokes": _strokes(),
    }
    with shards.ShardWriter(raw / "shards", "raw", 50) as w:
        for key, img in pictures.items():
            w.write(shards.Record(key, _encoded(img, "PNG"), "png", key, {"url": f"h/{key}"}))
        copy = _encoded(_circle("red"), "JPEG", quality=75)
        w.write(shards.Record("copy", copy, "jpg", "red circle, jpeg", {"url": "h/copy"}))
    params = config.resolve(
        {
            "ingest": {"dataset": "url-list", "processes": 1, "threads": 1},
            "validate": {"val_fraction": 0.5},
        }
    )
    report = validate.run(params, raw, tmp_path / "clean")
    rejects = pd.read_parquet(tmp_path / "clean" / "rejects.parquet")
    assert dict(zip(rejects.key, rejects.failed_checks, strict=True)) == {"copy": "near_duplicate"}
    [pair] = report["duplicates"]["first_pairs"]
    assert pair["earlier"] == "red-circle" and pair["bits"] <= BITS
    assert report["train"] + report["val"] == len(pictures)
