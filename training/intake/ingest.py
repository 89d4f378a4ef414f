"""Phase ``ingest``: image-caption sources -> webdataset shards, through img2dataset.

Every source becomes a URL list that img2dataset downloads, resizes and writes as
webdataset shards with per-shard stats (``intake/sources.py``). Built-in sets and
local folders are served from a loopback HTTP server, so they take exactly the path web
data takes. Downloads go through Kiln's fetch guard (``intake/guard.py``: SSRF guard,
total deadline, byte cap, image checks).

Incremental: ``out_dir`` (``data/raw``, a DVC ``persist`` output) is the base. A re-run
keeps the rows it already holds and fetches only what the source gained
(``intake/sync.py``); ``report.json``'s ``sync`` says how many rows were new, kept,
retried and removed.

Resuming: img2dataset writes into a work folder (``data/.work/ingest``), never into the
DVC output, in its ``incremental`` mode: a shard is done when its ``_stats.json`` exists,
so a re-run after a crash or Ctrl-C downloads only the shards that were not finished (a
shard killed mid-write has no stats file and is redone from scratch — it is never
published). The work folder carries a fingerprint of the params, source and base; a
different one starts over. When every shard is complete they join the kept ones in
``data/raw/shards``, with
``report.json`` (successes, failures by reason) and ``rejects.parquet`` (one row per
sample that did not land: key, url, reason).

Reproducible: img2dataset writes a shard's samples in the order their downloads finish,
and stamps tar members and stats with the time. Before publishing, every shard is
rewritten in key order with fixed tar metadata, its parquet sorted by key and its stats
stripped of timings; the loopback URLs of served sources (``http://127.0.0.1:<random
port>/path``) are recorded as ``kiln://<dataset>/path``. The same source and params then
give byte-identical ``data/raw`` (and so the same clean split, the same DVC hashes, the
same trained models).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from training import paths as P
from training.config import BUILTIN_DATASETS, Params, fingerprint
from training.console import say
from training.disk import replace_dir, restore_dir, write_json
from training.intake import sources, sync, unfinished
from training.intake.canonical import canonicalize_shard, public_source, stable_url
from training.intake.guard import is_transient, policy_for
from training.intake.kinds import SOURCE_KINDS
from training.intake.serve import LOOPBACK, serve_directory
from training.intake.url_plan import plan_url_list

# ---- img2dataset -----------------------------------------------------------------------


def img2dataset_resize_mode(mode: str) -> str:
    """img2dataset's resize mode for Kiln's ``ingest.resize_mode``. buckets is Kiln's:
    img2dataset takes the shorter side to image_size, aspect kept (keep_ratio), and
    validate fits each image to its bucket (it knows them all; img2dataset has one
    target size). The others are img2dataset's own."""
    return "keep_ratio" if mode == "buckets" else mode


def max_aspect_ratio(image_size: int, resize_mode: str, max_pixels: int) -> float:
    """The widest picture img2dataset may resize: taking the shorter side to
    ``image_size`` (keep_ratio, center_crop, buckets) makes a 1 x 40,000 strip of 116
    bytes 256 x 10,240,000 px, 7 GiB in one thread (was: unbounded). Bounded as the
    source is, by ``max_pixels``; refused as "aspect ratio too large". Validate's own
    ``max_aspect_ratio`` (2 by default) rejects far narrower ones anyway, with the
    picture counted."""
    if img2dataset_resize_mode(resize_mode) not in ("keep_ratio", "center_crop"):
        return float("inf")  # the longer side goes to image_size, or nothing is resized
    return max_pixels / image_size**2


def download(
    url_list: Path,
    out_dir: Path,
    params: Params,
    policy,
    extra_cols: list[str] | None = None,
) -> None:
    """One img2dataset call (incremental: finished shards in ``out_dir`` are kept)."""
    c = params.ingest
    # first: sets NO_ALBUMENTATIONS_UPDATE before img2dataset loads
    from training.intake import download as hook

    i2d = importlib.import_module("img2dataset.main")  # the package exports a function too

    original_downloader, original_sigint = i2d.Downloader, signal.getsignal(signal.SIGINT)
    i2d.Downloader = hook.guarded_downloader_class(policy)
    try:
        i2d.download(
            url_list=str(url_list),
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            save_additional_columns=extra_cols,
            output_format="webdataset",
            output_folder=str(out_dir),
            image_size=c.image_size,
            resize_mode=img2dataset_resize_mode(c.resize_mode),
            max_aspect_ratio=max_aspect_ratio(c.image_size, c.resize_mode, c.max_pixels),
            encode_format="png",
            encode_quality=c.png_compression,  # png: zlib level; lossless either way
            processes_count=c.processes,
            thread_count=c.threads,
            number_sample_per_shard=c.samples_per_shard,
            timeout=c.timeout_s,
            retries=c.retries,
            distributor=c.distributor,
            compute_hash="sha256",
            incremental_mode="incremental",
            enable_wandb=False,
        )
    except SystemExit:
        # img2dataset's own SIGINT handler ends with sys.exit(0): that is an interrupt,
        # not a success — finished shards are kept for the re-run
        raise KeyboardInterrupt from None
    finally:
        i2d.Downloader = original_downloader
        signal.signal(signal.SIGINT, original_sigint)


def _shard_ids(directory: Path, pattern: str) -> set[str]:
    return {p.name.split("_")[0].split(".")[0] for p in directory.glob(pattern)}


def finished_shards(directory: Path) -> tuple[list[str], list[str]]:
    """(complete shard ids, incomplete ones): complete = img2dataset wrote its stats,
    which it does only after closing the tar and its parquet. A stats file cut short
    (a full disk) is removed: img2dataset redoes a shard only when it has none."""
    unfinished.drop_cut_stats(directory)
    done = _shard_ids(directory, "*_stats.json")
    started = _shard_ids(directory, "*.tar") | _shard_ids(directory, "*.parquet")
    return sorted(done), sorted(started - done)


def summarize(shard_dir: Path) -> dict:
    """Aggregate img2dataset's ``*_stats.json`` into one report."""
    totals: Counter = Counter()
    reasons: Counter = Counter()
    shards = 0
    for f in sorted(shard_dir.glob("*_stats.json")):
        st = json.loads(f.read_text())
        shards += 1
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[k] += int(st.get(k, 0))
        for reason, n in st.get("status_dict", {}).items():
            if reason != "success":
                reasons[reason] += int(n)
    return {"shards": shards, **dict(totals), "failures_by_reason": dict(reasons.most_common())}


def collect_rejects(shard_dir: Path, out: Path) -> int:
    """One row per sample that did not land (``shards.REJECT_COLUMNS``), from
    img2dataset's per-shard parquet; streamed shard by shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.intake.shards import rejects_schema

    schema = rejects_schema()
    n = 0
    files = sorted(shard_dir.glob("*.parquet"))
    say(f"ingest: listing the rows that did not land, from {len(files)} shard(s)")
    with pq.ParquetWriter(out, schema) as writer:
        for p in tqdm(files, "ingest: rejects", unit="shard", disable=len(files) < 20):
            t = pq.read_table(p, columns=["key", "url", "caption", "status", "error_message"])
            d = t.to_pydict()
            rows = [i for i, s in enumerate(d["status"]) if s != "success"]
            if not rows:
                continue
            writer.write_table(
                pa.table(
                    {
                        "key": [d["key"][i] for i in rows],
                        "url": [d["url"][i] for i in rows],
                        "caption": [(d["caption"][i] or "")[:200] for i in rows],
                        "stage": ["ingest"] * len(rows),
                        "reason": [d["error_message"][i] or d["status"][i] for i in rows],
                        "failed_checks": [""] * len(rows),
                    },
                    schema=schema,
                )
            )
            n += len(rows)
    return n


# ---- the stage -------------------------------------------------------------------------
def _source_fingerprint(params: Params, out_dir: Path) -> str:
    """What makes a half-finished work folder reusable: same params, same source, same
    base (``sync.base_state``: the fetch list is planned against it)."""
    kind = SOURCE_KINDS[params.ingest.dataset]
    return fingerprint(
        params.seed,
        params.ingest.model_dump(mode="json"),
        kind.identity(params),
        sync.base_state(out_dir),
    )


def check_source(params: Params) -> None:
    """Refuse, before any work folder exists or any download starts, what no retry can
    fix: no source, a source that is not there or not the right kind of thing, a
    distributor that is not installed. Raises ``SourceError`` (a ``ValueError``) with
    one line naming the path and what to do."""
    c = params.ingest
    SOURCE_KINDS[c.dataset].check(params)
    if c.distributor != "multiprocessing" and importlib.util.find_spec(c.distributor) is None:
        raise sources.SourceError(
            f"ingest.distributor is {c.distributor!r} but {c.distributor} is not installed "
            f"(pip install {c.distributor}, or use distributor: multiprocessing)"
        )


def source_state(params: Params) -> dict:
    """The source as DVC sees it (``data/source.json``, the ``source`` probe stage): its
    kind, where it is, how many entries it has (files, shards) and a fingerprint of them
    (``identity``: a URL list's bytes, a folder's names, sizes and times, the shard
    list). A built-in set has none: its params say it all. Raises ``SourceError`` for a
    source that vanished, before any work."""
    check_source(params)
    c = params.ingest
    identity = SOURCE_KINDS[c.dataset].identity(params)
    # a built-in set reads none; a signed URL is recorded without its signature
    source = None if c.dataset in BUILTIN_DATASETS else public_source(c.source)
    return {
        "dataset": c.dataset,
        "source": source,
        "entries": len(identity),
        "fingerprint": fingerprint(c.dataset, source, identity),
    }


def _prepare_work(work: Path, fp: str) -> None:
    marker = work / "fingerprint.json"
    if work.exists():
        old = json.loads(marker.read_text()).get("fingerprint") if marker.exists() else None
        if old == fp:
            done, _ = finished_shards(work / "shards")
            if done:
                say(f"ingest: resuming: {len(done)} finished shards kept from the last run")
            return
        shutil.rmtree(work)
    work.mkdir(parents=True)
    marker.write_text(json.dumps({"fingerprint": fp}))


def run(params: Params, out_dir: Path, work_dir: Path) -> dict:
    """Bring ``out_dir`` in line with ``params.ingest``'s source: ``shards/`` (tars,
    per-shard parquet and stats), ``report.json`` and ``rejects.parquet``. What
    ``out_dir`` already holds from this source is kept, and only the rest is fetched
    (``intake/sync.py``)."""
    check_source(params)
    restore_dir(out_dir / "shards", work_dir.parent / f".{work_dir.name}-replaced")
    _prepare_work(work_dir, _source_fingerprint(params, out_dir))
    try:
        return _ingest(params, out_dir, work_dir)
    except sources.SourceError:
        # the source cannot be ingested as it is: nothing in the work folder is reusable
        shutil.rmtree(work_dir, ignore_errors=True)
        raise


def _say_plan(plan: sync.Plan, total: int) -> None:
    if plan.full:
        say(f"ingest: fetching all {total} rows ({plan.full})")
        return
    n = plan.counts()
    say(
        f"ingest: {total} rows: {n['kept']} already fetched and kept, {n['new']} new"
        + (f", {n['retried']} that failed last time" if n["retried"] else "")
        + f"; {n['removed']} no longer in the source, dropped"
        + (" (an edited caption or replaced picture is one of each)" if n["removed"] else "")
    )


def _ingest(params: Params, out_dir: Path, work_dir: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    i2d_dir = work_dir / "shards"
    prep = SOURCE_KINDS[params.ingest.dataset].prepare(params, work_dir)
    fetch_list = work_dir / "fetch.parquet"
    if prep.url_list is not None:  # web URLs: fetched as they are, through the guard
        plan, total = plan_url_list(params, out_dir, prep.url_list, fetch_list)
        _say_plan(plan, total)
        if plan.fetching:
            download(fetch_list, i2d_dir, params, policy_for(params), [sync.ROW_ID])
        return publish(params, i2d_dir, out_dir, work_dir, prep.report, plan)
    digests = [
        sync.file_digest(prep.folder / r["path"])
        for r in tqdm(prep.rows, "ingest: hashing", unit="file", disable=len(prep.rows) < 5000)
    ]
    ids = [
        sync.file_row_id(r["path"], r["caption"], d)
        for r, d in zip(prep.rows, digests, strict=True)
    ]
    plan = sync.plan(params, out_dir, ids)
    plan.carried = sync.carry(out_dir / "shards", ids, digests, [r["path"] for r in prep.rows])
    _say_plan(plan, len(ids))
    if plan.fetch:
        rows = [{**prep.rows[i], sync.ROW_ID: ids[i]} for i in plan.fetch]
        extra = [*(prep.extra_cols or ()), sync.ROW_ID]
        with serve_directory(prep.folder) as base:
            table = sources.url_rows(base, rows)
            for col in extra:
                table[col] = [r[col] for r in rows]
            pq.write_table(pa.table(table), fetch_list)
            say(f"ingest: serving {len(rows)} images on {base}; fetching with img2dataset")
            download(fetch_list, i2d_dir, params, policy_for(params, (LOOPBACK,)), extra)
    return publish(params, i2d_dir, out_dir, work_dir, prep.report, plan)


def publish(
    params: Params, i2d_dir: Path, out_dir: Path, work_dir: Path, extra: dict, plan: sync.Plan
) -> dict:
    """The base's kept rows plus the complete new shards become ``out_dir/shards``;
    refuses to publish while any new shard is incomplete."""
    i2d_dir.mkdir(parents=True, exist_ok=True)
    done, incomplete = finished_shards(i2d_dir)
    if incomplete:  # a full disk, a network fault or a kill (a retry may finish those)
        shard_bytes = min(params.ingest.samples_per_shard, plan.fetching or 1)
        shard_bytes *= params.ingest.image_size**2 * 3 + 2048  # a picture and its members
        raise unfinished.error(i2d_dir, incomplete, len(done), shard_bytes)
    fix_url = stable_url(params.ingest.dataset)
    # after img2dataset's last shard: what runs before the final line, said (was silent)
    say(f"ingest: publishing {len(done)} new shard(s) in key order, {len(plan.keep)} kept")
    for shard_id in tqdm(done, "ingest: key order", unit="shard", disable=len(done) < 20):
        canonicalize_shard(i2d_dir, shard_id, fix_url)
    shard_dir = out_dir / "shards"
    staged = work_dir / "staged"
    sync.assemble(plan, shard_dir, i2d_dir, staged, params.ingest.samples_per_shard)
    out_dir.mkdir(parents=True, exist_ok=True)
    replace_dir(staged, shard_dir, work_dir.parent / f".{work_dir.name}-replaced")
    rejected = collect_rejects(shard_dir, out_dir / "rejects.parquet")
    report = {
        "dataset": params.ingest.dataset,
        "image_size": params.ingest.image_size,
        **summarize(shard_dir),
        "rejected": rejected,
        "fetch_fingerprint": sync.fetch_fingerprint(params),
        **extra,
    }
    # what this run did (new, kept, removed) goes to the metrics and MLflow, not into
    # data/raw: a re-run that changed nothing leaves data/raw byte-identical, so DVC
    # runs nothing downstream
    write_json(out_dir / "report.json", report)
    shutil.rmtree(work_dir, ignore_errors=True)
    print_report(report)
    if not report.get("successes"):
        raise no_image_error(report, out_dir / "rejects.parquet")
    return {**report, **{f"rows_{k}": v for k, v in plan.counts().items()}}


def no_image_error(report: dict, rejects: Path) -> Exception:
    """The error for a run in which not one image landed: a ``SourceError`` (not worth
    retrying) when every failure would repeat (refused, malformed, HTTP 404, not an
    image...), a ``RuntimeError`` when some were the network's (timeouts, 5xx), which a
    retry may get past."""

    reasons: dict[str, int] = report.get("failures_by_reason", {})
    top = "; ".join(f"{n} {why}" for why, n in list(reasons.items())[:3])
    msg = (
        f"no image could be downloaded: all {report.get('count', 0)} failed"
        + (f" ({top})" if top else "")
        + f"; every row is listed in {rejects}"
    )
    if any(is_transient(why) for why in reasons):
        return ConnectionError(msg)  # the flow retries these; SourceError it does not
    if "--allow-network" not in top and any(
        why.startswith("refused: ") and "address" in why for why in reasons
    ):
        msg += "; --allow-network CIDR (ingest.allow_networks) opens a private range"
    return sources.SourceError(msg)


def print_report(report: dict) -> None:
    say(
        f"ingest: {report.get('successes', 0)}/{report.get('count', 0)} images in "
        f"{report['shards']} shards"
    )
    for reason, n in report["failures_by_reason"].items():
        say(f"ingest:   {n:6d}  {reason}")


def stage(params: Params, log=None) -> dict:
    """The DVC stage: params.yaml's source -> ``data/raw``."""
    return run(params, P.RAW, P.WORK / "ingest")
