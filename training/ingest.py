"""Phase ``ingest``: image-caption sources -> webdataset shards, through img2dataset.

Built-in sets are rendered to PNG files and served from a loopback HTTP server, so they
take exactly the path web data takes: a URL list read by img2dataset, downloaded,
resized and written as webdataset shards with per-shard stats. Those stats are
aggregated into one ingestion report (successes, failures by reason).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from training import mechanics as M
from training.config import Params


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        pass


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 (ephemeral port); yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def render_builtin(params: Params, directory: Path) -> list[dict]:
    """Render the built-in dataset to ``directory``; returns url-list rows (relative)."""
    from training import builtin

    c = params.ingest
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    samples = builtin.generate(
        c.dataset, c.num_samples, c.image_size, params.seed, c.include_held_out
    )
    for i, s in enumerate(samples):
        name = f"{i:07d}.png"
        s.image.save(directory / name)
        rows.append({"path": name, "caption": s.caption, "meta": s.meta_json()})
    return rows


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


def download(
    url_list: Path,
    input_format: str,
    out_dir: Path,
    params: Params,
    url_col: str,
    caption_col: str,
    extra_cols: list[str] | None = None,
) -> None:
    c = params.ingest
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home
    from img2dataset import download as i2d_download

    i2d_download(
        url_list=str(url_list),
        input_format=input_format,
        url_col=url_col,
        caption_col=caption_col,
        save_additional_columns=extra_cols,
        output_format="webdataset",
        output_folder=str(out_dir),
        image_size=c.image_size,
        resize_mode=c.resize_mode,
        encode_format="png",
        encode_quality=9,  # png: compression level; lossless either way
        processes_count=c.processes,
        thread_count=c.threads,
        number_sample_per_shard=c.samples_per_shard,
        timeout=c.timeout_s,
        retries=c.retries,
        distributor="multiprocessing",
        compute_hash="sha256",
        enable_wandb=False,
    )


def run(params: Params, out_dir: Path, work_dir: Path) -> dict:
    """Ingest ``params.ingest`` into ``out_dir``: ``shards/`` (img2dataset's own folder:
    it treats every file there as one of its shards) and ``report.json``."""
    import pandas as pd

    c = params.ingest
    shard_dir = out_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    if c.dataset == "url-list":
        if not c.url_list:
            raise ValueError("ingest.dataset is 'url-list' but ingest.url_list is not set")
        src = Path(c.url_list)
        if not src.is_file():
            raise FileNotFoundError(f"url list {src} does not exist")
        fmt = {
            ".parquet": "parquet",
            ".csv": "csv",
            ".tsv": "tsv",
            ".jsonl": "json",
            ".json": "json",
            ".txt": "txt",
        }.get(src.suffix.lower())
        if fmt is None:
            raise ValueError(f"{src}: unsupported url list format (parquet/csv/tsv/jsonl)")
        M.say(f"ingest: downloading {src} with img2dataset")
        download(src, fmt, shard_dir, params, c.url_col, c.caption_col)
    else:
        source = work_dir / "source"
        shutil.rmtree(source, ignore_errors=True)
        rows = render_builtin(params, source)
        # digits has 1,797 images in all: say how many there are, not how many were asked
        M.say(f"ingest: rendered {len(rows)} '{c.dataset}' samples at {c.image_size} px")
        with serve_directory(source) as base:
            urls = pd.DataFrame(
                {
                    "url": [f"{base}/{r['path']}" for r in rows],
                    "caption": [r["caption"] for r in rows],
                    "meta": [r["meta"] for r in rows],
                }
            )
            url_list = work_dir / "urls.parquet"
            urls.to_parquet(url_list)
            M.say(f"ingest: serving {len(rows)} images on {base}; fetching with img2dataset")
            download(url_list, "parquet", shard_dir, params, "url", "caption", ["meta"])
        shutil.rmtree(source, ignore_errors=True)
    report = {"dataset": c.dataset, "image_size": c.image_size, **summarize(shard_dir)}
    M.write_json(out_dir / "report.json", report)
    M.say(
        f"ingest: {report.get('successes', 0)}/{report.get('count', 0)} images in "
        f"{report['shards']} shards; failures: {report['failures_by_reason'] or 'none'}"
    )
    if not report.get("successes"):
        raise RuntimeError(f"ingest: no image could be downloaded ({report})")
    return report
