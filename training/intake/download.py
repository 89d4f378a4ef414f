"""Kiln's img2dataset hook: every download goes through the fetch guard, and every image
is checked and normalised before img2dataset's OpenCV sees it.

Kiln swaps img2dataset's ``download_image`` for :func:`download_image` inside each
img2dataset worker (:class:`GuardedDownloader`). The image is opened header-first:
declared sizes above ``max_pixels`` (decompression bombs) and bodies that are not images
are refused. It is then fully decoded (truncated files fail here, where OpenCV would
return a half-grey picture), and what OpenCV gets wrong is normalised: EXIF orientation
(OpenCV's ``IMREAD_UNCHANGED`` ignores it), CMYK, 16-bit, palette transparency and
animated GIFs are re-encoded as an upright 8-bit RGB PNG (first frame; transparency
composited on ``ingest.background``, white by default). A picture with an ICC colour
profile other than sRGB (Display P3 phone photos) is converted to sRGB, as OpenCV would
read its values as sRGB; an unreadable profile is refused. Plain 8-bit RGB/grey
JPEG/PNG/WebP with no profile or an sRGB one pass through byte for byte.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import warnings

from training.intake.guard import Policy, Refused, fetch_bytes, reason

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's albumentations phones home


# ---- image checks and normalisation ----------------------------------------------------
_PASS_FORMATS = ("JPEG", "PNG", "WEBP")


def normalize(
    data: bytes, max_pixels: int, background: tuple[int, int, int] = (255, 255, 255)
) -> bytes:
    """Check that ``data`` is one whole image of sane size; returns bytes OpenCV decodes
    correctly (the original when it already does). Raises Refused with the reason."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise Refused("empty body")
    # one reason for all (the report counts reasons); it names the knob, as a 48 MP
    # phone photo is over the default too (was: "decompression bomb" alone)
    too_big = (
        f"decompression bomb (declared size over ingest.max_pixels, {max_pixels:,}; "
        "raise it for photos that large)"
    )
    _allow_pixels(max_pixels)
    try:
        with warnings.catch_warnings():  # the declared size is judged below, by max_pixels
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        head = data[:64].lstrip().lower()
        kind = "html" if head.startswith((b"<!doctype html", b"<html")) else "unknown data"
        raise Refused(f"not an image ({kind})") from None
    except Image.DecompressionBombError:
        raise Refused(too_big) from None
    except Exception:  # a cut WebP fails in open (OSError), others in load (was: "OSError")
        raise Refused("truncated or corrupt image") from None
    w, h = img.size
    if w * h > max_pixels:
        raise Refused(too_big)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Exception:
        raise Refused("truncated or corrupt image") from None
    if img.mode == "F":  # was: clipped to 0 and 1 by convert(), a black picture kept
        raise Refused(
            "32-bit float pixels: the file does not say their range; save it as 8 or 16 bit"
        )
    frames = getattr(img, "n_frames", 1)
    orientation = img.getexif().get(0x0112, 1)
    icc = img.info.get("icc_profile") or None  # sRGB-equivalent ones change nothing
    if icc is not None and _is_srgb(icc):
        icc = None
    if (
        icc is None
        and img.format in _PASS_FORMATS
        and img.mode in ("RGB", "L")
        and not _png_16bit(data)
        and orientation == 1
        and frames == 1
        and "transparency" not in img.info
    ):
        return data  # RGBA never passes: OpenCV would drop the alpha, not composite it
    if frames > 1:
        img.seek(0)
    img = ImageOps.exif_transpose(img)
    if icc is not None:
        img = _to_srgb(img, icc)
    img = _to_rgb8(img, background)
    out = io.BytesIO()
    img.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def _allow_pixels(max_pixels: int) -> None:
    """Let Pillow open and decode what ``ingest.max_pixels`` allows. Pillow has no
    per-call limit: it reads its global ``MAX_IMAGE_PIXELS`` (89 M; refusing at twice
    that) in ``Image.open`` and again while decoding (TIFF tiles, GIF frames), so a
    ``max_pixels`` raised above 179 M still refused a 182 M picture, with a reason saying
    it was over the raised limit. normalize refuses by the declared size itself, before
    decoding, so the global is raised to ``max_pixels`` (Pillow then refuses only over
    twice that); it is never lowered, and left alone while ``max_pixels`` is under it
    (the default 40 M): no other code sees a change unless the user raised the limit,
    and in img2dataset's workers nothing but normalize opens pictures with Pillow."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _png_16bit(data: bytes) -> bool:
    """A PNG of 16 bits per channel (IHDR bit depth, byte 24). Pillow reads 16-bit RGB as
    mode "RGB", 8 bits; OpenCV keeps uint16, and img2dataset's ``border`` padding (255)
    is then near-black and its shards hold 16-bit PNGs. 16-bit grey and RGBA never pass
    (modes "I;16", "RGBA"), so this is only asked of the "RGB" and "L" that would."""
    return data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data[24:25] == b"\x10"


# Colour profiles. OpenCV (img2dataset decodes with it) ignores a picture's ICC profile,
# and the stored PNG carries none, so a Display P3 photo (phones shoot P3 by default) would
# be trained on its raw values: a P3 green (60, 200, 80) is sRGB (0, 203, 58), not
# (60, 200, 80). Such a picture is converted to sRGB here. Relative colourimetric, not
# perceptual: every colour sRGB can show keeps its exact value and only the ones outside
# sRGB are clipped to its edge (what browsers show); perceptual would shift in-gamut
# colours too, and the matrix profiles phones and cameras embed define no perceptual
# table, so it would mean the same thing or a table's house style. Black point
# compensation maps a print profile's paper black (CMYK) to black instead of grey; for
# RGB profiles both blacks are 0 and it changes nothing.
_UNREADABLE_ICC = "unreadable colour profile (ICC); save the picture as sRGB"
_ICC_SPACES = {
    "RGB": ("RGB", "RGBA", "P", "PA"),
    "GRAY": ("L", "LA", "1", "I;16", "I"),
    "CMYK": ("CMYK",),
}


def _icc_profile(icc: bytes):
    from PIL import ImageCms

    try:
        return ImageCms.ImageCmsProfile(io.BytesIO(icc))
    except Exception:  # PyCMSError, OSError: a cut or invented profile
        raise Refused(_UNREADABLE_ICC) from None


@functools.lru_cache(maxsize=64)
def _is_srgb(icc: bytes) -> bool:
    """Does this profile leave every colour where sRGB has it (within a level of
    rounding)? Then the picture is kept as it is, byte for byte: an sRGB profile,
    whoever wrote it, changes nothing, as before profiles were read. Tested on a cube of
    colours and every grey and primary ramp, not by the profile's name."""
    import numpy as np
    from PIL import Image

    src = _icc_profile(icc)
    if src.profile.xcolor_space.strip() != "RGB":
        return False
    levels = np.linspace(0, 255, 17).round().astype(np.uint8)
    cube = np.stack(np.meshgrid(levels, levels, levels), -1).reshape(-1, 3)
    ramp = np.arange(256, dtype=np.uint8)
    zero = np.zeros(256, np.uint8)
    ramps = [
        np.stack(c, -1)
        for c in ((ramp, ramp, ramp), (ramp, zero, zero), (zero, ramp, zero), (zero, zero, ramp))
    ]
    px = np.concatenate([cube, *ramps])[None]
    out = _convert(Image.fromarray(px, "RGB"), src)
    return int(np.abs(np.asarray(out, np.int16) - px).max()) <= 1


@functools.cache
def _srgb_profile():
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _convert(img, src):
    """``img`` (in ``src``'s colour space) as sRGB RGB, relative colourimetric with black
    point compensation (see above)."""
    from PIL import ImageCms

    try:
        return ImageCms.profileToProfile(
            img,
            src,
            _srgb_profile(),
            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
            outputMode="RGB",
            flags=ImageCms.Flags.BLACKPOINTCOMPENSATION,
        )
    except Exception:  # PyCMSError: a profile lcms reads but cannot build a transform from
        raise Refused(_UNREADABLE_ICC) from None


def _to_srgb(img, icc: bytes):
    """``img`` (upright) converted from its ICC profile to sRGB: mode RGB, or RGBA with
    its alpha untouched. A profile for another kind of picture (a CMYK profile on an
    RGB picture) is refused, not guessed around."""

    src = _icc_profile(icc)
    space = src.profile.xcolor_space.strip()
    if img.mode not in _ICC_SPACES.get(space, ()):
        raise Refused(f"colour profile (ICC) for another colour space ({space}) than the picture's")
    alpha = None
    if img.mode in ("P", "PA") or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        alpha = img.getchannel("A")
        img = img.convert(img.mode[:-1])
    if img.mode in ("1", "I;16", "I"):
        img = _to_rgb8(img, (0, 0, 0)).convert("L")
    out = _convert(img, src)
    out.info.pop("icc_profile", None)  # the values are sRGB now, as untagged ones are read
    if alpha is not None:
        out.putalpha(alpha)
    return out


def _to_rgb8(img, background: tuple[int, int, int]):
    import numpy as np
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16/32-bit grey
        a = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if a.max() > 255 or img.mode.startswith("I;16") else 255.0
        img = Image.fromarray(np.clip(a / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        under = Image.new("RGBA", rgba.size, (*background, 255))
        img = Image.alpha_composite(under, rgba)
    return img.convert("RGB")


# ---- the img2dataset hook --------------------------------------------------------------
_policy: Policy | None = None


def download_image(row, timeout, user_agent_token, disallowed_header_directives):
    """Drop-in for ``img2dataset.downloader.download_image``: (key, BytesIO|None, error)."""
    from img2dataset.downloader import is_disallowed

    key, url = row
    policy = _policy or Policy()
    try:
        body, headers = fetch_bytes(str(url), timeout, policy)
        if disallowed_header_directives and is_disallowed(
            headers, user_agent_token, disallowed_header_directives
        ):
            return key, None, "Use of image disallowed by X-Robots-Tag directive"
        data = normalize(body, policy.max_pixels, policy.background)
        return key, io.BytesIO(data), None
    except Refused as exc:
        return key, None, _worded(str(exc), policy)
    except Exception as exc:  # img2dataset records the message as the failure reason
        return key, None, reason(exc)


def _worded(why: str, policy: Policy) -> str:
    """The guard's byte-cap refusal naming the setting and its value, as the max_pixels
    one does (was: "larger than max_bytes" alone, for a user's own 38 MiB TIFF too). The
    limit is the same for every sample of a run, so reasons still add up in the report."""
    if why == "larger than max_bytes":
        return (
            f"larger than max_bytes (ingest.max_bytes, {policy.max_bytes:,} bytes; "
            "raise it for files that large)"
        )
    return why


def install(policy: Policy) -> None:
    """Route img2dataset's downloads in *this* process through :func:`download_image`."""
    global _policy
    import img2dataset.downloader as d

    _policy = policy
    d.download_image = download_image


def guarded_downloader_class(policy: Policy):
    """A factory img2dataset's ``download()`` calls in place of its ``Downloader``: the
    instance it returns is pickled to each spawned worker and installs the guard there
    before downloading a shard."""

    def factory(*args, **kwargs):
        if kwargs.get("sample_writer_class") is _writer_base():
            kwargs["sample_writer_class"] = WholeShardWriter
        d = GuardedDownloader(*args, **kwargs)
        d.kiln_policy = policy
        return d

    return factory


def _downloader_base():
    from img2dataset.downloader import Downloader

    return Downloader


def _writer_base():
    from img2dataset.writer import WebDatasetSampleWriter

    return WebDatasetSampleWriter


class WholeShardWriter(_writer_base()):  # type: ignore[misc]
    """img2dataset's webdataset writer, except that a shard one of whose writes failed
    fails as a whole when it is closed. img2dataset counts a picture as a success
    before writing it and takes a write's error (a full disk) as that one sample's:
    the shard went on, was closed, got its stats file and was kept as finished, with
    a tar cut at the failed member (tarfile reads up to there without a word). Found
    with a disk full for a moment: "300/300 images" published as 78. Failing at close,
    the shard gets no stats file, so img2dataset retries it and Kiln never takes it as
    finished."""

    failed: BaseException | None = None

    def write(self, *args, **kwargs):
        try:
            return super().write(*args, **kwargs)
        except Exception as exc:
            self.failed = self.failed or exc
            raise

    def close(self):
        super().close()
        if self.failed is not None:
            raise OSError(
                getattr(self.failed, "errno", None) or errno.EIO,
                f"shard {self.shard_id} not whole: a write failed ({self.failed})",
            ) from self.failed


class GuardedDownloader(_downloader_base()):  # type: ignore[misc]
    kiln_policy: Policy = Policy()

    def __call__(self, row):
        install(self.kiln_policy)
        return super().__call__(row)
