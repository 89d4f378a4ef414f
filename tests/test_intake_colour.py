"""Colour profiles at intake: a wide-gamut (Display P3) picture is stored as sRGB, and one
with no profile or an sRGB one is stored byte for byte as before. The profiles are
written here (matrix/TRC ICC v4, a few hundred bytes), nothing is downloaded."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageCms

from training.intake.download import Refused, normalize

D50 = (0.9642, 1.0, 0.8249)
# colorants adapted to D50, as ICC profiles store them
P3 = (
    (0.515102, 0.241182, -0.001050),
    (0.291965, 0.692236, 0.041882),
    (0.157153, 0.066582, 0.784168),
)
SRGB = (
    (0.436066, 0.222488, 0.013916),
    (0.385147, 0.716873, 0.097076),
    (0.143066, 0.060608, 0.714096),
)
SRGB_CURVE = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)
GREEN_P3 = (60, 200, 80)
GREEN_SRGB = (0, 205, 56)  # the review's sRGB rendering of that P3 green


def _s15(x: float) -> bytes:
    return struct.pack(">i", round(x * 65536))


def _icc(space: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    text = "kiln test profile".encode("utf-16-be")
    desc = b"mluc\0\0\0\0" + struct.pack(">IIII", 1, 12, 0x656E5553, len(text)) + b"\0\0\0\x1c"
    tags = [(b"desc", desc + text), (b"wtpt", _xyz(D50)), *tags]
    start = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += sig + struct.pack(">II", start + len(body), len(data))
        body += data
    head = struct.pack(">I", start + len(body)) + b"\0" * 4 + struct.pack(">I", 0x04300000)
    head += b"mntr" + space + b"XYZ " + b"\0" * 12 + b"acsp" + b"\0" * 28
    head += b"".join(_s15(v) for v in D50)
    return head + b"\0" * (128 - len(head)) + struct.pack(">I", len(tags)) + table + body


def _xyz(v) -> bytes:
    return b"XYZ \0\0\0\0" + b"".join(_s15(c) for c in v)


def _curve(params=SRGB_CURVE) -> bytes:
    return (
        b"para\0\0\0\0"
        + struct.pack(">HH", 3 if len(params) == 5 else 0, 0)
        + b"".join(_s15(v) for v in params)
    )


def rgb_profile(primaries) -> bytes:
    tags = [(sig, _xyz(p)) for sig, p in zip((b"rXYZ", b"gXYZ", b"bXYZ"), primaries, strict=True)]
    return _icc(b"RGB ", [*tags, (b"rTRC", _curve()), (b"gTRC", _curve()), (b"bTRC", _curve())])


def grey_profile(gamma: float) -> bytes:
    return _icc(b"GRAY", [(b"kTRC", _curve((gamma,)))])


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}), **kw)
    return buf.getvalue()


def _near(px, want, tol: int = 3) -> bool:
    return all(abs(int(a) - b) <= tol for a, b in zip(px, want, strict=True))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_a_p3_picture_is_stored_as_srgb(fmt: str):
    """Was: stored as its raw P3 values (60, 200, 80), the profile dropped: a duller,
    different green trained."""
    data = _encode(Image.new("RGB", (16, 8), GREEN_P3), fmt, icc_profile=rgb_profile(P3))
    stored = Image.open(io.BytesIO(normalize(data, 10**8)))
    assert stored.mode == "RGB" and "icc_profile" not in stored.info
    assert _near(stored.getpixel((4, 4)), GREEN_SRGB), stored.getpixel((4, 4))


def test_an_upright_turned_p3_photo_is_converted_too():
    """The EXIF-rotated path re-encodes; it kept the raw values as well (was: 60, 199, 80)."""
    img = Image.new("RGB", (16, 8), GREEN_P3)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees to view
    data = _encode(img, "JPEG", icc_profile=rgb_profile(P3), exif=exif)
    stored = Image.open(io.BytesIO(normalize(data, 10**8)))
    assert stored.size == (8, 16)
    assert _near(stored.getpixel((4, 8)), GREEN_SRGB), stored.getpixel((4, 8))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("profile", ["none", "pillow-srgb", "written-srgb"])
def test_no_profile_or_an_srgb_one_keeps_the_bytes(fmt: str, profile: str):
    """Existing datasets must not change: such a picture passes untouched, and the
    re-encoded (EXIF-rotated) one is what it was without a profile."""
    icc = {
        "none": None,
        "pillow-srgb": ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes(),
        "written-srgb": rgb_profile(SRGB),
    }[profile]
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8))
    kw = {"icc_profile": icc} if icc else {}
    data = _encode(img, fmt, **kw)
    assert normalize(data, 10**8) is data
    exif = img.getexif()
    exif[0x0112] = 3
    turned, bare = _encode(img, "JPEG", exif=exif, **kw), _encode(img, "JPEG", exif=exif)
    # the same pixels (the re-encoded PNG still carries the profile, as it always did)
    assert _pixels(normalize(turned, 10**8)) == _pixels(normalize(bare, 10**8))


def _pixels(data: bytes) -> bytes:
    return Image.open(io.BytesIO(data)).tobytes()


def test_a_grey_profile_is_applied_to_a_grey_picture():
    """A linear grey (gamma 1.0) mid level is much lighter in sRGB."""
    data = _encode(Image.new("L", (8, 8), 128), "PNG", icc_profile=grey_profile(1.0))
    px = Image.open(io.BytesIO(normalize(data, 10**8))).getpixel((2, 2))
    assert px[0] == px[1] == px[2] and 180 <= px[0] <= 192, px


def test_transparency_keeps_its_alpha_through_the_conversion():
    rgba = Image.new("RGBA", (8, 8), (*GREEN_P3, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 4, 8))
    data = _encode(rgba, "PNG", icc_profile=rgb_profile(P3))
    stored = Image.open(io.BytesIO(normalize(data, 10**8, (255, 255, 255))))
    assert stored.getpixel((1, 1)) == (255, 255, 255)
    assert _near(stored.getpixel((6, 6)), GREEN_SRGB)


@pytest.mark.parametrize(
    "icc, why",
    [
        (b"not a colour profile at all" * 8, "unreadable colour profile"),
        (rgb_profile(P3)[:150], "unreadable colour profile"),
        (grey_profile(2.2), r"colour profile \(ICC\) for another colour space \(GRAY\)"),
    ],
)
def test_an_unusable_profile_is_refused_with_its_reason(icc: bytes, why: str):
    """Neither a crash nor raw values silently kept as if they were sRGB."""
    data = _encode(Image.new("RGB", (8, 8), GREEN_P3), "PNG", icc_profile=icc)
    with pytest.raises(Refused, match=why):
        normalize(data, 10**8)
