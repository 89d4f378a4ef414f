"""Phase ``validate``: the quality gate between raw shards and training.

One metadata row per raw sample (original size and aspect, file size, decode check,
caption length, UTF-8 and printability, exact and near-duplicate image hashes, duplicate
URL) is validated by Great Expectations 1.x suites whose thresholds come from
``params.yaml``, one chunk of rows at a time, so memory stays flat as the data grows
(only the duplicate indexes grow: hashes, keys and caption tags of the kept samples, a
few hundred bytes a sample). The duplicate checks run after the others, in read order:
a sample rejected for anything else never counts as the earlier copy of a later one. Rows
failing any expectation are not dropped silently: they go to ``rejects.parquet`` with
the failed checks and a reason, next to ingest's own rejects; every GX run is also
rendered into Data Docs HTML. The rest are split train/val by a hash of the sample's URL
path — stable when data is added — and written as clean shards; with ``ingest.resize_mode:
buckets`` each image is first fitted to its aspect-ratio bucket and the shards are
written per bucket (``intake.buckets``, ``shards.BucketWriter``).
"""

from __future__ import annotations

import dataclasses
import heapq
import os
import shutil
from collections import Counter
from pathlib import Path

from training import paths as P
from training.config import Params
from training.console import say
from training.disk import write_json
from training.intake import buckets, precedence
from training.intake import captions as caption_lengths
from training.intake import pairs as dup_pairs
from training.intake.checks import (
    DUPLICATE_CHECKS,
    Gate,
    NearDuplicates,
    caption_tag,
    clean_caption,
    meta_row,
    near_duplicate_check,
)
from training.intake.split import (
    MIN_VAL_FOR_DISTRIBUTION,
    SplitError,
    carried_splits,
    split_hash,
    split_key,
    split_problem,
)

# Where a failed validate leaves its report and rejects: the stage's outputs are removed
# when it fails (training/cli/stage.py), so the error's "see rejects.parquet" named a
# file that was gone (found in review). Outside data/: no DVC out, nothing hashes it.
FAILED = P.STATE / "validate-failed"


def run(
    params: Params,
    raw_dir: Path,
    out_dir: Path,
    docs_dir: Path | None = None,
    report_dir: Path | None = None,
    failed_dir: Path | None = None,
) -> dict:
    """Gate the shards under ``raw_dir/shards`` (ingest's output) into ``out_dir``:
    ``train/`` and ``val/`` shards; ``rejects.parquet`` (ingest's rejects too, so one
    table lists every sample that did not make it, and why) and ``report.json`` in
    ``report_dir`` (default ``out_dir``); the GX HTML in ``docs_dir`` (default
    ``out_dir/data_docs``). The pipeline keeps both outside ``data/clean``: the clean
    data's hash, which every later stage depends on, must depend only on the data, and
    GX stamps the docs with the time, while a picture the gate rejects changes the
    rejects and the report but no clean shard (was: in data/clean, it retrained every
    model on the same data). Streams in chunks of ``validate.chunk_rows``. When the
    split is unusable (``SplitError``), the report and rejects are also copied to
    ``failed_dir``, which the error names: the failed stage's outputs do not survive."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.intake import shards

    c = params.validate_
    paths = shards.shard_paths(raw_dir / "shards")
    carried = carried_splits(raw_dir / "shards")  # renamed pictures keep their side
    sizes = params.buckets()
    gate = Gate(params, docs_dir or out_dir / "data_docs")
    schema = shards.rejects_schema()
    counts: Counter = Counter()
    seen_px: dict[str, str] = {}  # pixel hash (+ caption tag) -> first key
    near = NearDuplicates(c.near_duplicate_bits) if near_duplicate_check(params) else None
    by_caption = c.near_duplicates == "image+caption"
    pairs: list[dict] = []  # the first rejected duplicates, for the side-by-side page
    chars: Counter = Counter()  # caption lengths of the clean samples (histograms)
    words: Counter = Counter()
    n_pairs = 0
    seen_url: set[str] = set()
    n_samples = n_rejected = n_ingest = 0
    lowest: list[int] = []  # max-heap (negated) of the lowest split hashes of clean samples
    ingest_rejects = raw_dir / "rejects.parquet"
    report_dir = report_dir or out_dir
    for d in (out_dir, report_dir):
        d.mkdir(parents=True, exist_ok=True)
    with (
        _writer(out_dir, "train", c.samples_per_shard, sizes) as tr,
        _writer(out_dir, "val", c.samples_per_shard, sizes) as va,
        pq.ParquetWriter(report_dir / "rejects.parquet", schema) as rejects,
    ):
        if ingest_rejects.exists():  # carried over so the table is complete
            for batch in pq.ParquetFile(ingest_rejects).iter_batches():
                d = batch.to_pydict()
                d.setdefault("failed_checks", [""] * len(d["key"]))  # raw data from before
                cols = {k: d.get(k) for k in shards.REJECT_COLUMNS}
                rejects.write_table(pa.table(cols, schema=schema))
                counts.update(f"ingest: {r}" for r in d["reason"])
                n_ingest += len(d["key"])

        def judge_duplicates(rec, row: dict, h: int | None, passed: bool) -> None:
            """Set ``row``'s duplicate flags against the samples kept so far, and keep
            this one's picture and URL for the later ones only when it is kept itself:
            a first copy rejected for something else (an empty caption, a broken
            file) must not make the good copy after it a "duplicate" and lose the
            picture. Runs in read order, so "earlier" still means earlier (of exact
            copies, the one with the lowest split key is read first: precedence.py)."""
            nonlocal n_pairs
            tag = caption_tag(rec.caption) if by_caption else ""
            px = row["pixel_sha"] + tag
            earlier = seen_px.get(px) if row["pixel_sha"] else None
            hit = None
            if near is not None and h is not None and earlier is None:
                hit = near.find(h, tag)
            row["duplicate_image"] = earlier is not None
            row["near_duplicate"] = hit is not None
            # a URL fetched again is the same picture: a copy on the policy's terms too
            # (was: under image+caption a second caption of one URL, COCO's five a
            # picture, went as a duplicate whatever its caption)
            url = row["url"] + tag if row["url"] else ""
            row["duplicate_url"] = bool(url) and url in seen_url
            if earlier is not None or hit is not None:
                n_pairs += 1
                if len(pairs) < dup_pairs.MAX_PAIRS:
                    pairs.append(
                        {"key": rec.key, "earlier": earlier, "bits": 0, "check": "duplicate_image"}
                        if earlier is not None
                        else {
                            "key": rec.key,
                            "earlier": hit[0],
                            "bits": hit[1],
                            "check": "near_duplicate",
                        }
                    )
            if not passed or any(row[name] for name in DUPLICATE_CHECKS):
                return
            if row["pixel_sha"]:
                seen_px[px] = rec.key
            if near is not None and h is not None:
                near.add(h, rec.key, tag)
            if url:
                seen_url.add(url)

        def flush(chunk: list) -> None:
            nonlocal n_rejected
            if not chunk:
                return
            failed = gate.check(pd.DataFrame([row for _, row, _ in chunk]), "quality")
            for rec, row, h in chunk:
                judge_duplicates(rec, row, h, passed=not failed.get(rec.key))
            cols = ("key", *DUPLICATE_CHECKS)
            flags = pd.DataFrame([{n: row[n] for n in cols} for _, row, _ in chunk])
            duplicates = gate.check(flags, "duplicates")
            bad = []
            for rec, row, _ in chunk:
                names = failed.get(rec.key, []) + duplicates.get(rec.key, [])
                if names:
                    bad.append((rec, row, names))
                    continue
                chars[row["caption_chars"]] += 1
                words[caption_lengths.words(rec.caption)] += 1
                url = carried.get(rec.meta.get("row_id", ""), row["url"])
                h = split_hash(split_key(url, rec.key))
                _put(va if h < c.val_fraction * 0x100000000 else tr, rec, sizes)
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
        say(f"validate: checking {len(paths)} shards with Great Expectations")
        from tqdm import tqdm

        # of exact copies, the one with the lowest split key first (``precedence.py``)
        samples = precedence.ordered(paths, carried)
        for rec in tqdm(samples, desc="validate", unit="sample", mininterval=2):
            # the one place captions are normalised (``checks.clean_caption``): the
            # checks, the report, the rejects and the clean shards all see this caption
            caption = clean_caption(rec.caption)
            if caption != rec.caption:
                rec = dataclasses.replace(rec, caption=caption)
            row = meta_row(rec)
            h = row.pop("dhash")
            n_samples += 1
            chunk.append((rec, row, h))
            if len(chunk) >= c.chunk_rows:
                flush(chunk)
                chunk = []
        flush(chunk)
    docs = gate.build_docs()
    page = dup_pairs.write_page(
        paths, pairs, n_pairs, c.near_duplicates, docs.parent / "duplicates.html"
    )
    report = {
        "samples": n_samples,
        "train": tr.total,
        "val": va.total,
        "rejected": n_rejected,
        "ingest_rejected": n_ingest,
        "rejected_by_check": dict(counts.most_common()),
        # the clean captions' lengths; words as CLIP's pre-tokenizer cuts them, so each
        # caption is at least words + 2 tokens (train_clip measures the tokens)
        "caption_chars": caption_lengths.summary(chars),
        "caption_words": caption_lengths.summary(words),
        # relative to the report, so it is the same wherever it ran
        "data_docs": Path(os.path.relpath(docs, report_dir)).as_posix(),
        "duplicates": {
            "policy": c.near_duplicates,
            "rejected": n_pairs,
            "page": Path(os.path.relpath(page, report_dir)).as_posix(),
            "first_pairs": pairs,
        },
    }
    if sizes:
        report["buckets"] = {"train": tr.sizes(), "val": va.sizes()}
    kept = failed_dir or report_dir
    error, warning = split_problem(
        tr.total + va.total,
        tr.total,
        va.total,
        c.val_fraction,
        [-h for h in lowest],
        (kept / "rejects.parquet").as_posix(),
    )
    if warning:
        report["warning"] = warning
    write_json(report_dir / "report.json", report)
    if failed_dir is not None:
        shutil.rmtree(failed_dir, ignore_errors=True)  # an older failure's, now stale
        if error:  # the outs go with the failed stage: what the user reads, kept here
            failed_dir.mkdir(parents=True)
            for name in ("report.json", "rejects.parquet"):
                shutil.copy2(report_dir / name, failed_dir / name)
            shutil.copytree(docs.parent, failed_dir / docs.parent.name)
            docs, page = (failed_dir / docs.parent.name / f.name for f in (docs, page))
    say(f"validate: {report['train']} train, {report['val']} val, {n_rejected} rejected")
    w = report["caption_words"]
    say(
        f"validate: captions are {w['p50']} words (median), {w['p95']} (p95), {w['max']} (max); "
        "train_clip picks the text context from their token lengths"
    )
    for name, n in counts.most_common():
        why = gate.described.get(name, "")
        say(f"validate:   {n:6d}  {name}{f' ({why})' if why else ''}")
    if sizes and report["buckets"]["train"]:
        shown = ", ".join(f"{b} {n}" for b, n in report["buckets"]["train"].items())
        say(f"validate: train images per aspect-ratio bucket: {shown}")
    say(f"validate: Great Expectations Data Docs: {docs}")
    if n_pairs:
        say(
            f"validate: {n_pairs} duplicates rejected (policy {c.near_duplicates}); "
            f"side by side: {page}"
        )
    if warning:
        say(f"validate: warning: {warning}")
    if error:
        raise SplitError(error)
    return report


def _writer(out_dir: Path, split: str, per_shard: int, sizes: list | None):
    from training.intake import shards

    if sizes is None:
        return shards.ShardWriter(out_dir / split, split, per_shard)
    return shards.BucketWriter(out_dir / split, split, per_shard, buckets.name(sizes[0]))


def _put(writer, rec, sizes: list | None) -> None:
    """Write ``rec``, fitted to its bucket when bucketing."""
    if sizes is None:
        writer.write(rec)
        return
    data, size = buckets.fit_png(rec.image_bytes, sizes)
    if data is not rec.image_bytes:
        rec = dataclasses.replace(rec, image_bytes=data, image_ext="png")
    writer.write(rec, buckets.name(size))


def metrics(report: dict) -> dict[str, float]:
    """Flat numbers for MLflow: totals and one ``rejected.<check>`` per reason."""
    out = {k: float(report[k]) for k in ("samples", "train", "val", "rejected", "ingest_rejected")}
    for what in ("caption_chars", "caption_words"):
        out.update({f"{what}_{k}": float(v) for k, v in report.get(what, {}).items()})
    for name, n in report["rejected_by_check"].items():
        safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)
        out[f"rejected.{safe}"] = float(n)
    return out


def stage(params: Params, log) -> dict:
    """The DVC stage: ``data/raw`` -> ``data/clean`` (+ the report and rejects in
    ``data/validation``, Data Docs, logged with the run; on an unusable split, the
    report and rejects in ``FAILED``)."""
    report = run(params, P.RAW, P.CLEAN, P.DOCS, P.VALIDATION, FAILED)
    log.log_metrics(metrics(report))
    log.log_artifacts(P.DOCS, "data_docs")
    return report
