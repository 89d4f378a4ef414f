"""The quality checks: one metadata row per raw sample, and the Great Expectations suites
that judge it.

A row holds the original picture's size and aspect, file size, a decode check, caption
length, UTF-8 and control characters, exact and near-duplicate image hashes and a
duplicate-URL flag. The GX 1.x suites' thresholds come from ``params.yaml``; they run one
chunk of rows at a time (the duplicate checks second, ``Gate``), so memory stays flat as
the data grows (only the duplicate indexes grow, a few hundred bytes a sample), and every
run is rendered into Data Docs HTML.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import unicodedata
from pathlib import Path

from training.config import BUILTIN_DATASETS, Params
from training.intake.captions import plain_text

CAPTION_REPLACEMENT = "\ufffd"  # what undecodable caption bytes became on the way in

# Control characters (category Cc) that are only layout: multi-line CSV/JSONL captions
# carry newlines and tabs. They are whitespace, so ``clean_caption`` folds them into
# spaces; every other Cc character (NUL, ESC, the C1 set, the \x1c-\x1f separators,
# which Python also calls whitespace) is a broken caption, as is a lone surrogate (Cs:
# no UTF-8 text holds one). Format characters (Cf: zero-width joiner of emoji
# sequences, soft hyphen) and other spaces (NBSP, U+3000, thin spaces) are ordinary text.
_LAYOUT_CONTROLS = frozenset("\t\n\r\x0b\x0c\x85")
# runs of whitespace, the \x1c-\x1f separators excepted (they must stay to be rejected)
_SPACE_RUN = re.compile(r"[^\S\x1c-\x1f]+")


def clean_caption(caption: str) -> str:
    """``caption`` with every run of whitespace (newlines, tabs, NBSP, ideographic and
    thin spaces) as one plain space, stripped. validate applies it once, as it reads a
    sample, so the checks, the report, the rejects table and the clean shards that
    training reads all hold the same caption. HTML references, full-width letters and
    ligatures are made plain text first (``captions.plain_text``)."""
    # strip(" "), not strip(): that would also drop the separators, hiding them
    return _SPACE_RUN.sub(" ", plain_text(caption)).strip(" ")


def caption_is_text(caption: str) -> bool:
    """False when ``caption`` holds a real control character (category Cc other than
    layout whitespace) or a lone surrogate (Cs); see ``_LAYOUT_CONTROLS``."""
    return not any(
        unicodedata.category(ch) in ("Cc", "Cs") and ch not in _LAYOUT_CONTROLS for ch in caption
    )


def visible_chars(caption: str) -> int:
    """``caption``'s length without format characters (category Cf: zero-width space,
    word joiner, soft hyphen, a second BOM), which draw nothing: a caption of those
    alone is empty (was: 1 character, printable, and trained as a caption). A ZWJ
    inside an emoji sequence is not counted either; the emoji it joins are."""
    return len("".join(ch for ch in caption if unicodedata.category(ch) != "Cf").strip())


HASH_BITS = 192
# A flat or nearly flat picture hashes to (almost) all zeros, so any two of them would
# look "near" each other; below this many set bits only exact duplicates count.
MIN_HASH_BITS = 12
# How much brighter (0-255 levels) a thumbnail cell must be than its neighbour to set a
# bit. Without it a flat field (white paper, a flat red) sits on a tie that JPEG's noise
# and chroma subsampling or a resampler's ringing break either way at random: a PNG and
# a JPEG copy (quality 75-90) of red-on-white clip art hashed 13-27 bits apart, and more
# once rescaled. 8 levels is above that noise after the thumbnail's averaging; a real
# edge is tens of levels.
DEAD_BAND = 8.0
# A large picture is first box-reduced (by a whole factor) to a smallest side of 64-127
# px: thumbnail cells still average 7+ pixels, so copies hash alike, and its four
# thumbnails then cost what a small picture's do (a 1024 px image hashes faster than with
# the old single thumbnail).
_HASH_FROM_PX = 64
# BT.601 luma and the two colour differences (JPEG's YCbCr without the 128 offsets, which
# cancel in a difference). JPEG keeps luma almost exactly and blurs and quantises the
# colour differences; hashing those apart keeps the colour noise out of the luma bits.
_YCC = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


def dhash(img) -> int:
    """Colour-aware difference hash, 192 bits: is each cell of a small thumbnail more
    than ``DEAD_BAND`` brighter than its left (upper) neighbour, for luma across a 9x8
    and down an 8x9 thumbnail (64 + 64 bits), and for each colour difference (Cb, Cr)
    across a 5x4 and down a 4x5 one (2 x (16 + 16) bits, coarse as JPEG keeps colour).
    Rescaled and re-encoded copies of one picture (PNG or JPEG at ordinary qualities,
    chroma subsampled or not) land within a few bits of each other, saturated clip art
    on white too; a ramp gentler than the band over a cell sets no bits, so a very
    low-contrast picture counts as flat (``MIN_HASH_BITS``: exact duplicates only).

    Changed in the colour-clip-art fix (was: per RGB channel, any brighter cell set its
    bit, and a channel flat across an edge hid the colour: a blue and a purple circle
    were 1 bit apart): re-validating a collection may reject a few copies the old hash
    let through, and keeps some colour variants (skin tones) it used to drop. Hashes are never
    stored: validate hashes every raw sample again on each run, and DVC re-runs it when
    this file changes, so no hash of the old kind is ever compared with a new one."""
    import numpy as np
    from PIL import Image

    rgb = img.convert("RGB")
    if min(rgb.size) >= 2 * _HASH_FROM_PX:  # a box reduce first: 4 thumbnails of it are cheap
        rgb = rgb.reduce(min(rgb.size) // _HASH_FROM_PX)
    ycc = np.array(_YCC, dtype=np.float32).T

    def thumb(w: int, h: int):  # (h, w, [Y, Cb, Cr]); resizing is linear, so resize first
        return np.asarray(rgb.resize((w, h), Image.Resampling.BILINEAR), np.float32) @ ycc

    wide, tall, cwide, ctall = thumb(9, 8), thumb(8, 9), thumb(5, 4), thumb(4, 5)
    rises = [np.diff(wide[..., 0], axis=1), np.diff(tall[..., 0], axis=0)]
    for c in (1, 2):
        rises += [np.diff(cwide[..., c], axis=1), np.diff(ctall[..., c], axis=0)]
    bits = np.concatenate([r.ravel() > DEAD_BAND for r in rises])
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


class NearDuplicates:
    """Streaming near-duplicate finder: the earlier image whose hash is within
    ``max_bits`` (Hamming) of this one, if any. Multi-index hashing: the bits are cut
    into max_bits+1 bands, and by the pigeonhole principle a match within max_bits
    agrees exactly on at least one band, so only hashes sharing a band are compared.
    ``tag`` narrows a match to entries with the same tag (the caption, for the
    ``image+caption`` policy). Memory: the hash, tag and key of each kept image, and a
    reference to them per band (~250 bytes an image at 6 bits).

    A band takes every (max_bits+1)-th bit, not a run of adjacent ones. The hash's
    runs are regions of meaning (the last 64 bits are colour, the first 64 the rows of
    the luma thumbnail), and a run that is all zeros for most pictures made one bucket
    that every later picture was compared with, one by one: every greyscale picture
    has no colour bits, so a collection of 20,000 black-and-white photos took minutes
    and grew with the square of its size (found at scale). Spread over the whole hash,
    each band holds some luma bits of every row and both directions. Any partition
    into max_bits+1 bands keeps the pigeonhole guarantee, so what is rejected is
    unchanged; only which earlier copy is named may differ when there are several."""

    def __init__(self, max_bits: int):
        self.k = max_bits
        n = max_bits + 1
        self.masks = [sum(1 << b for b in range(i, HASH_BITS, n)) for i in range(n)]
        self.index: list[dict[int, list[tuple[int, str, str]]]] = [{} for _ in self.masks]

    def _keys(self, h: int) -> list[int]:
        return [h & mask for mask in self.masks]

    def find(self, h: int, tag: str = "") -> tuple[str, int] | None:
        """(key of the earlier near-duplicate, bits apart), or None. Remembers nothing:
        validate ``add``s an image only once it is kept, so a rejected sample never
        claims a picture that a later, good copy then loses to."""
        if h.bit_count() < MIN_HASH_BITS:  # flat pictures: all hashes alike, no evidence
            return None
        for idx, band in zip(self.index, self._keys(h), strict=True):
            for other, other_tag, other_key in idx.get(band, ()):
                bits = (other ^ h).bit_count()
                if bits <= self.k and other_tag == tag:
                    return other_key, bits
        return None

    def add(self, h: int, key: str, tag: str = "") -> None:
        """Remember ``h`` under ``key`` for later ``find``s (flat pictures are not)."""
        if h.bit_count() < MIN_HASH_BITS:
            return
        entry = (h, tag, key)  # one tuple shared by every band's list
        for idx, band in zip(self.index, self._keys(h), strict=True):
            idx.setdefault(band, []).append(entry)


def caption_tag(caption: str) -> str:
    """What ``image+caption`` compares: the caption, case and spacing aside."""
    return hashlib.sha1(" ".join(caption.lower().split()).encode()).hexdigest()[:16]


def original_size(meta: dict) -> tuple[int, int] | None:
    """(width, height) of the picture as it was before img2dataset resized it, from
    the ``original_width``/``original_height`` img2dataset writes into every sample's
    json (Kiln's ingest keeps them; every source kind goes through img2dataset), or
    None where they are missing or not positive integers.

    The size checks must read these: img2dataset has already resized the stored image
    (upscaling small ones too), so under ``buckets`` its short side is always
    ``image_size`` and under ``border``/``center_crop`` it is always square, and
    ``min_side``/``max_aspect_ratio`` would never fire on it."""
    w, h = meta.get("original_width"), meta.get("original_height")
    if type(w) is int and type(h) is int and w > 0 and h > 0:  # not bool, not None
        return w, h
    return None


def meta_row(rec) -> dict:
    """The metadata row the quality checks judge. Width, height and aspect are the
    original picture's (``original_size``); where a shard does not record it (shards
    written by hand, not by ingest) they fall back to the stored image's size."""
    from PIL import Image

    caption = rec.caption
    row = {
        "key": rec.key,
        "url": str(rec.meta.get("url", "")),
        "caption_chars": visible_chars(caption),
        # not str.isprintable(): that is False for NBSP, U+3000, ZWJ, soft hyphen, \n...
        "caption_printable": caption_is_text(caption),
        "caption_utf8": CAPTION_REPLACEMENT not in caption,
        "file_bytes": len(rec.image_bytes),
        "decoded": True,
        "width": 0,
        "height": 0,
        "aspect": 1.0,
        "pixel_sha": "",
        "dhash": None,
    }
    try:
        with Image.open(io.BytesIO(rec.image_bytes)) as img:
            img.load()
            size = original_size(rec.meta) or img.size
            row["width"], row["height"] = size
            row["aspect"] = max(size) / max(1, min(size))
            rgb = img.convert("RGB")
            row["pixel_sha"] = hashlib.sha256(rgb.tobytes()).hexdigest()
            row["dhash"] = dhash(rgb)
    except Exception:
        row["decoded"] = False
    return row


def near_duplicate_check(params: Params) -> bool:
    return (
        params.validate_.near_duplicates != "off" and params.ingest.dataset not in BUILTIN_DATASETS
    )


def checks(params: Params) -> list[tuple[str, object, str]]:
    """(check name, GX expectation, what a failure means). The name is the metadata
    column; every threshold is a params.yaml value."""
    import great_expectations as gx

    c = params.validate_
    E = gx.expectations
    out = [
        (
            "decoded",
            E.ExpectColumnValuesToBeInSet(column="decoded", value_set=[True]),
            "image does not decode",
        ),
        (
            "width",
            E.ExpectColumnValuesToBeBetween(column="width", min_value=c.min_side),
            f"narrower than {c.min_side} px",
        ),
        (
            "height",
            E.ExpectColumnValuesToBeBetween(column="height", min_value=c.min_side),
            f"shorter than {c.min_side} px",
        ),
        (
            "aspect",
            E.ExpectColumnValuesToBeBetween(column="aspect", max_value=c.max_aspect_ratio),
            f"aspect ratio above {c.max_aspect_ratio}",
        ),
        (
            "file_bytes",
            E.ExpectColumnValuesToBeBetween(
                column="file_bytes", min_value=c.min_file_bytes, max_value=c.max_file_bytes
            ),
            f"file size outside [{c.min_file_bytes}, {c.max_file_bytes}] bytes",
        ),
        (
            "caption_chars",
            E.ExpectColumnValuesToBeBetween(
                column="caption_chars", min_value=c.min_caption_chars, max_value=c.max_caption_chars
            ),
            f"caption length outside [{c.min_caption_chars}, {c.max_caption_chars}] characters",
        ),
        (
            "caption_utf8",
            E.ExpectColumnValuesToBeInSet(column="caption_utf8", value_set=[True]),
            "caption was not valid UTF-8",
        ),
        (
            "caption_printable",
            E.ExpectColumnValuesToBeInSet(column="caption_printable", value_set=[True]),
            "caption has control characters",
        ),
        (
            "duplicate_image",
            E.ExpectColumnValuesToBeInSet(column="duplicate_image", value_set=[False]),
            "exact duplicate of an earlier image"
            + (" with the same caption" if c.near_duplicates == "image+caption" else ""),
        ),
        (
            "duplicate_url",
            E.ExpectColumnValuesToBeInSet(column="duplicate_url", value_set=[False]),
            "URL already ingested",
        ),
    ]
    if near_duplicate_check(params):
        out.append(
            (
                "near_duplicate",
                E.ExpectColumnValuesToBeInSet(column="near_duplicate", value_set=[False]),
                f"near-duplicate of an earlier image (hash within {c.near_duplicate_bits} bits"
                + (", same caption)" if c.near_duplicates == "image+caption" else ")"),
            )
        )
    return out


# The checks that compare a sample with the ones kept before it. validate decides them
# after the others, in read order: only a sample that passed every other check may be
# the "earlier" copy of a later one (``validate.run``).
DUPLICATE_CHECKS = ("duplicate_image", "duplicate_url", "near_duplicate")


class Gate:
    """The GX context, two suites and their validation definitions, built once and run
    per chunk of metadata rows: ``quality`` (every check but the duplicate ones) first,
    then ``duplicates`` on the flags validate computed knowing which samples passed;
    every run's result also goes into the Data Docs site."""

    def __init__(self, params: Params, docs_dir: Path):
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
        import great_expectations as gx

        self.checks = checks(params)
        self.described = {name: why for name, _, why in self.checks}
        ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = {"globally": False}
        ctx.add_data_docs_site(
            "kiln",
            {
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir.resolve()),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        asset = ctx.data_sources.add_pandas("kiln").add_dataframe_asset("samples")
        batch_def = asset.add_batch_definition_whole_dataframe("chunk")
        self.vds = {}
        for part, suite_name, vd_name in (
            ("quality", "kiln-samples", "quality-gate"),
            ("duplicates", "kiln-duplicates", "duplicate-gate"),
        ):
            suite = gx.ExpectationSuite(name=suite_name)
            for name, exp, _ in self.checks:
                if (name in DUPLICATE_CHECKS) == (part == "duplicates"):
                    suite.add_expectation(exp)
            suite = ctx.suites.add(suite)
            self.vds[part] = ctx.validation_definitions.add(
                gx.ValidationDefinition(name=vd_name, data=batch_def, suite=suite)
            )
        self.ctx, self.docs_dir = ctx, docs_dir

    def check(self, table, part: str = "quality") -> dict[str, list[str]]:
        """{key: [failed check, ...]} for the rows of ``table`` that fail the ``part``
        suite (``quality`` or ``duplicates``)."""
        result = self.vds[part].run(
            batch_parameters={"dataframe": table},
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["key"]},
        )
        failed: dict[str, list[str]] = {}
        for r in result.results:
            name = r.expectation_config.kwargs.get("column")
            for hit in r.result.get("unexpected_index_list") or []:
                failed.setdefault(str(hit["key"]), []).append(name)
        return failed

    def build_docs(self) -> Path:
        self.ctx.build_data_docs(site_names=["kiln"])
        return self.docs_dir / "index.html"
