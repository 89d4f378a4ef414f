"""The quality checks: one metadata row per raw sample, and the Great Expectations suite
that judges it.

A row holds size, aspect, file size, a decode check, caption length, UTF-8 and
printability, exact and near-duplicate image hashes and a duplicate-URL flag. The GX 1.x
suite's thresholds come from ``params.yaml``; it runs one chunk of rows at a time, so
memory stays flat as the data grows (only the duplicate indexes grow, a few hundred
bytes a sample), and every run is rendered into Data Docs HTML.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from training.config import BUILTIN_DATASETS, Params

CAPTION_REPLACEMENT = "\ufffd"  # what undecodable caption bytes became on the way in


HASH_BITS = 192
# A flat or nearly flat picture hashes to (almost) all zeros, so any two of them would
# look "near" each other; below this many set bits only exact duplicates count.
MIN_HASH_BITS = 12


def dhash(img) -> int:
    """Colour-aware difference hash: per RGB channel, is each pixel of a 9x8 thumbnail
    brighter than its right neighbour (192 bits). Rescaled and re-encoded copies of one
    picture land within a few bits of each other."""
    import numpy as np
    from PIL import Image

    a = np.asarray(img.convert("RGB").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (a[:, 1:, :] > a[:, :-1, :]).transpose(2, 0, 1).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


class NearDuplicates:
    """Streaming near-duplicate finder: the earlier image whose hash is within
    ``max_bits`` (Hamming) of this one, if any. Multi-index hashing: the bits are cut
    into max_bits+1 bands, and by the pigeonhole principle a match within max_bits
    agrees exactly on at least one band, so only hashes sharing a band are compared.
    ``tag`` narrows a match to entries with the same tag (the caption, for the
    ``image+caption`` policy). Memory: the hash, tag and key of each kept image, and a
    reference to them per band (~250 bytes an image at 6 bits)."""

    def __init__(self, max_bits: int):
        self.k = max_bits
        n = max_bits + 1
        edges = [round(i * HASH_BITS / n) for i in range(n + 1)]
        self.bands = [(lo, hi - lo) for lo, hi in zip(edges, edges[1:], strict=False)]
        self.index: list[dict[int, list[tuple[int, str, str]]]] = [{} for _ in self.bands]

    def match(self, h: int, key: str, tag: str = "") -> tuple[str, int] | None:
        """(key of the earlier near-duplicate, bits apart), or None: then ``h`` is
        remembered under ``key``."""
        if h.bit_count() < MIN_HASH_BITS:  # flat pictures: all hashes alike, no evidence
            return None
        keys = [(h >> lo) & ((1 << width) - 1) for lo, width in self.bands]
        for idx, band in zip(self.index, keys, strict=True):
            for other, other_tag, other_key in idx.get(band, ()):
                bits = (other ^ h).bit_count()
                if bits <= self.k and other_tag == tag:
                    return other_key, bits
        entry = (h, tag, key)  # one tuple shared by every band's list
        for idx, band in zip(self.index, keys, strict=True):
            idx.setdefault(band, []).append(entry)
        return None


def caption_tag(caption: str) -> str:
    """What ``image+caption`` compares: the caption, case and spacing aside."""
    return hashlib.sha1(" ".join(caption.lower().split()).encode()).hexdigest()[:16]


def meta_row(rec) -> dict:
    from PIL import Image

    caption = rec.caption
    row = {
        "key": rec.key,
        "url": str(rec.meta.get("url", "")),
        "caption_chars": len(caption.strip()),
        "caption_printable": caption.isprintable(),
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
            row["width"], row["height"] = img.size
            row["aspect"] = max(img.size) / max(1, min(img.size))
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


class Gate:
    """The GX context, suite and validation definition, built once and run per chunk of
    metadata rows; every run's result also goes into the Data Docs site."""

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
        suite = gx.ExpectationSuite(name="kiln-samples")
        for _, exp, _ in self.checks:
            suite.add_expectation(exp)
        suite = ctx.suites.add(suite)
        self.vd = ctx.validation_definitions.add(
            gx.ValidationDefinition(name="quality-gate", data=batch_def, suite=suite)
        )
        self.ctx, self.docs_dir = ctx, docs_dir

    def check(self, table) -> dict[str, list[str]]:
        """{key: [failed check, ...]} for the rows of ``table`` that fail."""
        result = self.vd.run(
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
