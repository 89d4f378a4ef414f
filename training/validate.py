"""Phase ``validate``: the quality gate between raw shards and training.

One metadata row per raw sample (size, aspect, file size, decode check, caption length,
UTF-8 and printability, exact and near-duplicate image hashes, duplicate URL) is
validated by a Great Expectations 1.x suite whose thresholds come from ``params.yaml``,
one chunk of rows at a time, so memory stays flat as the data grows (only the hash sets
for duplicate detection grow, 32-64 bytes a sample). Rows failing any expectation are not
dropped silently: they go to ``rejects.parquet`` with the failed checks and a reason, next
to ingest's own rejects; every GX run is also rendered into Data Docs HTML. The rest are
split train/val by a hash of the sample's URL path — stable when data is added — and
written as clean shards.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import os
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from training import mechanics as M
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
    """Streaming near-duplicate finder: is a hash within ``max_bits`` (Hamming) of one
    seen before? Multi-index hashing: the bits are cut into max_bits+1 bands, and by the
    pigeonhole principle a match within max_bits agrees exactly on at least one band, so
    only hashes sharing a band are compared. Memory: one int per kept image."""

    def __init__(self, max_bits: int):
        self.k = max_bits
        n = max_bits + 1
        edges = [round(i * HASH_BITS / n) for i in range(n + 1)]
        self.bands = [(lo, hi - lo) for lo, hi in zip(edges, edges[1:], strict=False)]
        self.index: list[dict[int, list[int]]] = [{} for _ in self.bands]

    def seen(self, h: int) -> bool:
        if h.bit_count() < MIN_HASH_BITS:  # flat pictures: all hashes alike, no evidence
            return False
        keys = [(h >> lo) & ((1 << width) - 1) for lo, width in self.bands]
        for idx, key in zip(self.index, keys, strict=True):
            for other in idx.get(key, ()):
                if (other ^ h).bit_count() <= self.k:
                    return True
        for idx, key in zip(self.index, keys, strict=True):
            idx.setdefault(key, []).append(h)
        return False


def _meta_row(rec) -> dict:
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
        params.validate_.near_duplicate_bits is not None
        and params.ingest.dataset not in BUILTIN_DATASETS
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
            "exact duplicate of an earlier image",
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
                f"near-duplicate of an earlier image (hash within {c.near_duplicate_bits} bits)",
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


def split_key(url: str, key: str) -> str:
    """What the train/val split hashes: the URL's path and query, without scheme and
    host, so a mirror, or the random loopback port the built-in sets are served from,
    does not reshuffle the split between runs; the sample key when there is no URL."""
    if not url:
        return key
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def split_hash(url_or_key: str) -> int:
    """A sample's place in [0, 2**32): it goes to val when below ``fraction * 2**32``."""
    return int(hashlib.sha1(url_or_key.encode()).hexdigest()[:8], 16)


def in_val(url_or_key: str, fraction: float) -> bool:
    return split_hash(url_or_key) < fraction * 0x100000000


# What the evaluation needs of the val split: one image at all (reconstruction PSNR, and
# for user data the prompts are the val captions), and for the distribution metrics
# (fd_clip, cmmd_clip) two halves of at least two images each
# (evaluate_extras.MIN_SAMPLES; tests/test_eval_small_val.py keeps the two in step).
MIN_VAL = 1
MIN_VAL_FOR_DISTRIBUTION = 4


class SplitError(ValueError):
    """The clean data cannot be split into usable train and val sets (user-fixable:
    more images or another ``validate.val_fraction``)."""


def fraction_for(lowest: list[int], want: int, n_clean: int) -> float | None:
    """The smallest ``val_fraction`` (four decimals: coarser rounding could sweep further
    samples into val, even all of them) that puts ``want`` of the clean samples in val,
    from the ``want`` lowest split hashes, leaving one for train; None when there are
    too few samples for that."""
    import math

    if want >= n_clean or len(lowest) < want:
        return None
    f = math.ceil((sorted(lowest)[want - 1] + 1) / 0x100000000 * 10000) / 10000
    return f if f < 1.0 else None


def split_problem(
    n_clean: int, n_train: int, n_val: int, fraction: float, lowest: list[int]
) -> tuple[str | None, str | None]:
    """(error, warning) about the split's sizes, each one line in words with what to
    change: an error when training or evaluation cannot run at all, a warning when
    the evaluation will have to skip its distribution metrics."""
    more = "add images"
    if n_clean == 0:
        return "no image passed the quality gate; see rejects.parquet for why", None
    if n_train == 0:
        return (
            f"0 of {n_clean} clean images went to train (validate.val_fraction is "
            f"{fraction}); lower validate.val_fraction or {more}"
        ), None
    if n_val < MIN_VAL:
        f = fraction_for(lowest, MIN_VAL_FOR_DISTRIBUTION, n_clean) or fraction_for(
            lowest, MIN_VAL, n_clean
        )
        how = f"raise validate.val_fraction to {f} or {more}" if f else more
        return (
            f"{n_val} of {n_clean} clean images went to val (validate.val_fraction is "
            f"{fraction}); evaluation needs at least {MIN_VAL}: {how}"
        ), None
    if n_val < MIN_VAL_FOR_DISTRIBUTION:
        f = fraction_for(lowest, MIN_VAL_FOR_DISTRIBUTION, n_clean)
        how = f"raise validate.val_fraction to {f} or {more}" if f else more
        return None, (
            f"only {n_val} of {n_clean} clean images went to val (validate.val_fraction is "
            f"{fraction}); evaluate will skip fd_clip and cmmd_clip, which need "
            f"{MIN_VAL_FOR_DISTRIBUTION}: {how}"
        )
    return None, None


REJECT_COLUMNS = ["key", "url", "caption", "stage", "reason", "failed_checks"]


def run(params: Params, raw_dir: Path, out_dir: Path, docs_dir: Path | None = None) -> dict:
    """Gate the shards under ``raw_dir/shards`` (ingest's output) into ``out_dir``:
    ``train/`` and ``val/`` shards, ``rejects.parquet`` (ingest's rejects too, so one
    table lists every sample that did not make it, and why) and ``report.json``, plus
    the GX HTML in ``docs_dir`` (default ``out_dir/data_docs``). The pipeline keeps the
    docs outside ``data/clean``: GX stamps them with the time, and the clean data's hash,
    which every later stage depends on, must depend only on the data. Streams in chunks
    of ``validate.chunk_rows``."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from training import shards

    c = params.validate_
    paths = shards.shard_paths(raw_dir / "shards")
    gate = Gate(params, docs_dir or out_dir / "data_docs")
    schema = pa.schema([(n, pa.string()) for n in REJECT_COLUMNS])
    counts: Counter = Counter()
    seen_px: set[str] = set()
    near = NearDuplicates(c.near_duplicate_bits or 0) if near_duplicate_check(params) else None
    seen_url: set[str] = set()
    n_samples = n_rejected = n_ingest = 0
    lowest: list[int] = []  # max-heap (negated) of the lowest split hashes of clean samples
    ingest_rejects = raw_dir / "rejects.parquet"
    out_dir.mkdir(parents=True, exist_ok=True)
    with (
        shards.ShardWriter(out_dir / "train", "train", c.samples_per_shard) as tr,
        shards.ShardWriter(out_dir / "val", "val", c.samples_per_shard) as va,
        pq.ParquetWriter(out_dir / "rejects.parquet", schema) as rejects,
    ):
        if ingest_rejects.exists():  # carried over so the table is complete
            for batch in pq.ParquetFile(ingest_rejects).iter_batches():
                d = batch.to_pydict()
                d["failed_checks"] = [""] * len(d["key"])
                rejects.write_table(pa.table({k: d.get(k) for k in REJECT_COLUMNS}, schema=schema))
                counts.update(f"ingest: {r}" for r in d["reason"])
                n_ingest += len(d["key"])

        def flush(chunk: list) -> None:
            nonlocal n_rejected
            if not chunk:
                return
            table = pd.DataFrame([row for _, row in chunk])
            failed = gate.check(table)
            bad = []
            for rec, row in chunk:
                names = failed.get(rec.key)
                if names:
                    bad.append((rec, row, names))
                    continue
                h = split_hash(split_key(row["url"], rec.key))
                (va if h < c.val_fraction * 0x100000000 else tr).write(rec)
                # the lowest hashes say which val_fraction would give a usable split
                if len(lowest) < MIN_VAL_FOR_DISTRIBUTION:
                    heapq.heappush(lowest, -h)
                elif -lowest[0] > h:
                    heapq.heapreplace(lowest, -h)
            if bad:
                rejects.write_table(
                    pa.table(
                        {
                            "key": [r.key for r, _, _ in bad],
                            "url": [row["url"] for _, row, _ in bad],
                            "caption": [r.caption[:200] for r, _, _ in bad],
                            "stage": ["validate"] * len(bad),
                            "reason": [gate.described[n[0]] for _, _, n in bad],
                            "failed_checks": [", ".join(n) for _, _, n in bad],
                        },
                        schema=schema,
                    )
                )
                for _, _, names in bad:
                    counts.update(names)
                n_rejected += len(bad)

        chunk: list = []
        M.say(f"validate: checking {len(paths)} shards with Great Expectations")
        from tqdm import tqdm

        for rec in tqdm(shards.read(paths), desc="validate", unit="sample", mininterval=2):
            row = _meta_row(rec)
            row["duplicate_image"] = bool(row["pixel_sha"]) and row["pixel_sha"] in seen_px
            h = row.pop("dhash")
            row["near_duplicate"] = (
                near is not None and h is not None and not row["duplicate_image"] and near.seen(h)
            )
            row["duplicate_url"] = bool(row["url"]) and row["url"] in seen_url
            seen_px.add(row["pixel_sha"])
            seen_url.add(row["url"])
            n_samples += 1
            chunk.append((rec, row))
            if len(chunk) >= c.chunk_rows:
                flush(chunk)
                chunk = []
        flush(chunk)
    docs = gate.build_docs()
    report = {
        "samples": n_samples,
        "train": tr.total,
        "val": va.total,
        "rejected": n_rejected,
        "ingest_rejected": n_ingest,
        "rejected_by_check": dict(counts.most_common()),
        # relative to the stage's output, so the report is the same wherever it ran
        "data_docs": Path(os.path.relpath(docs, out_dir)).as_posix(),
    }
    error, warning = split_problem(
        tr.total + va.total, tr.total, va.total, c.val_fraction, [-h for h in lowest]
    )
    if warning:
        report["warning"] = warning
    M.write_json(out_dir / "report.json", report)
    M.say(f"validate: {report['train']} train, {report['val']} val, {n_rejected} rejected")
    for name, n in counts.most_common():
        why = gate.described.get(name, "")
        M.say(f"validate:   {n:6d}  {name}{f' ({why})' if why else ''}")
    M.say(f"validate: Great Expectations Data Docs: {docs}")
    if warning:
        M.say(f"validate: warning: {warning}")
    if error:
        raise SplitError(error)
    return report


def metrics(report: dict) -> dict[str, float]:
    """Flat numbers for MLflow: totals and one ``rejected.<check>`` per reason."""
    out = {k: float(report[k]) for k in ("samples", "train", "val", "rejected", "ingest_rejected")}
    for name, n in report["rejected_by_check"].items():
        safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)
        out[f"rejected.{safe}"] = float(n)
    return out
