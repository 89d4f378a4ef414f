"""Phase ``validate``: the quality gate between raw shards and training.

One metadata row per raw sample (size, aspect, bytes, decode check, caption checks,
duplicate image / URL) is validated by a Great Expectations 1.x suite whose thresholds
come from ``params.yaml``. Rows failing any expectation are not dropped silently: they go
to ``rejects.parquet`` with the failed expectations as the reason. The rest are split
train/val by a hash of the sample's URL path — stable when data is added — and written as
clean shards.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from training import mechanics as M
from training.config import Params


def _meta_row(rec) -> dict:
    from PIL import Image

    row = {
        "key": rec.key,
        "url": str(rec.meta.get("url", "")),
        "caption": rec.caption,
        "caption_chars": len(rec.caption.strip()),
        "caption_printable": rec.caption.isprintable(),
        "file_bytes": len(rec.image_bytes),
        "decoded": True,
        "width": 0,
        "height": 0,
        "aspect": 1.0,
        "pixel_sha": "",
    }
    try:
        with Image.open(io.BytesIO(rec.image_bytes)) as img:
            img.load()
            row["width"], row["height"] = img.size
            row["aspect"] = max(img.size) / max(1, min(img.size))
            row["pixel_sha"] = hashlib.sha256(img.convert("RGB").tobytes()).hexdigest()
    except Exception:
        row["decoded"] = False
    return row


def build_suite(params: Params):
    """The expectation suite; every threshold is a params.yaml value."""
    import great_expectations as gx

    c = params.validate_
    E = gx.expectations
    suite = gx.ExpectationSuite(name="kiln-samples")
    for exp in (
        E.ExpectColumnValuesToBeInSet(column="decoded", value_set=[True]),
        E.ExpectColumnValuesToBeBetween(column="width", min_value=c.min_side),
        E.ExpectColumnValuesToBeBetween(column="height", min_value=c.min_side),
        E.ExpectColumnValuesToBeBetween(column="aspect", max_value=c.max_aspect_ratio),
        E.ExpectColumnValuesToBeBetween(
            column="caption_chars", min_value=c.min_caption_chars, max_value=c.max_caption_chars
        ),
        E.ExpectColumnValuesToBeInSet(column="caption_printable", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="duplicate_image", value_set=[False]),
        E.ExpectColumnValuesToBeInSet(column="duplicate_url", value_set=[False]),
    ):
        suite.add_expectation(exp)
    return suite


def check(params: Params, table) -> dict[str, list[str]]:
    """Run the suite over the metadata table; returns {key: [failed expectation, ...]}."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = {"globally": False}
    asset = ctx.data_sources.add_pandas("kiln").add_dataframe_asset("samples")
    batch_def = asset.add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(build_suite(params))
    vd = ctx.validation_definitions.add(
        gx.ValidationDefinition(name="gate", data=batch_def, suite=suite)
    )
    result = vd.run(
        batch_parameters={"dataframe": table},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["key"]},
    )
    failed: dict[str, list[str]] = {}
    for r in result.results:
        cfg = r.expectation_config
        name = f"{cfg.type}({cfg.kwargs.get('column')})"
        for hit in r.result.get("unexpected_index_list") or []:
            failed.setdefault(str(hit["key"]), []).append(name)
    return failed


def split_key(url: str, key: str) -> str:
    """What the train/val split hashes: the URL's path and query, without scheme and
    host, so a mirror, or the random loopback port the built-in sets are served from,
    does not reshuffle the split between runs; the sample key when there is no URL."""
    if not url:
        return key
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def in_val(url_or_key: str, fraction: float) -> bool:
    h = int(hashlib.sha1(url_or_key.encode()).hexdigest()[:8], 16)
    return h < fraction * 0x100000000


def run(params: Params, raw_dir: Path, out_dir: Path) -> dict:
    import pandas as pd

    from training import shards

    c = params.validate_
    paths = shards.shard_paths(raw_dir)
    rows, seen_px, seen_url = [], set(), set()
    for rec in shards.read(paths):
        row = _meta_row(rec)
        row["duplicate_image"] = bool(row["pixel_sha"]) and row["pixel_sha"] in seen_px
        row["duplicate_url"] = bool(row["url"]) and row["url"] in seen_url
        seen_px.add(row["pixel_sha"])
        seen_url.add(row["url"])
        rows.append(row)
    table = pd.DataFrame(rows)
    M.say(f"validate: checking {len(table)} samples with Great Expectations")
    failed = check(params, table)

    counts: Counter = Counter()
    with (
        shards.ShardWriter(out_dir / "train", "train", c.samples_per_shard) as tr,
        shards.ShardWriter(out_dir / "val", "val", c.samples_per_shard) as va,
    ):
        for rec in shards.read(paths):
            if rec.key in failed:
                continue
            key = split_key(str(rec.meta.get("url") or ""), rec.key)
            split = va if in_val(key, c.val_fraction) else tr
            split.write(rec)
    rejects = pd.DataFrame(
        [
            {
                "key": k,
                "url": table.loc[table.key == k, "url"].iloc[0],
                "failed_expectations": ", ".join(v),
                "reason": v[0],
            }
            for k, v in failed.items()
        ],
        columns=["key", "url", "failed_expectations", "reason"],
    )
    rejects.to_parquet(out_dir / "rejects.parquet")
    for reasons in failed.values():
        counts.update(reasons)
    report = {
        "samples": len(table),
        "train": tr.total,
        "val": va.total,
        "rejected": len(failed),
        "rejected_by_expectation": dict(counts.most_common()),
    }
    M.write_json(out_dir / "report.json", report)
    M.say(
        f"validate: {report['train']} train, {report['val']} val, {report['rejected']} "
        f"rejected {report['rejected_by_expectation'] or ''}"
    )
    if tr.total == 0 or va.total == 0:
        raise RuntimeError(f"validate: an empty split is unusable ({report})")
    return report
