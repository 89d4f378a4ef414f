"""Ingestion and validation throughput, and peak memory as the data grows 10x.

Usage (from the repository root; ~5 minutes on 2 cores):
    .venv/bin/python benchmarks/ingest_throughput.py [--n 1000]

Serves N generated 512x384 JPEG "photos" from a loopback HTTP server and ingests them
three ways in one run, at 32 px and at 256 px output:

- ``kiln``: Kiln's img2dataset call (fetch guard, full-decode check, PNG output,
  ingest.processes/threads from the tiny profile);
- ``img2dataset, same settings``: the identical call without Kiln's guard — isolates
  what the guard and its checks cost;
- ``img2dataset defaults``: img2dataset's own defaults (1 process, 256 threads, JPEG)
  at the same image size.

Then the quality gate (``validate``) over the 32 px shards in samples/s, and peak RSS of
``validate`` and of ``ingest`` (parent + img2dataset workers) for N and 10N samples:
streaming means the 10N figure stays close to the N one. Each measurement runs in a fresh
subprocess so RSS figures do not mix.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_photos(directory: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        img = coarse.resize((512, 384), Image.Resampling.BICUBIC)
        img.save(directory / f"{i:06d}.jpg", quality=85)


CHILD = r"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
mode, url_list, out = sys.argv[2], sys.argv[3], Path(sys.argv[4])
size, n = int(sys.argv[5]), int(sys.argv[6])
from training import config
params = config.resolve({"ingest": {"dataset": "url-list", "image_size": size,
                                     "samples_per_shard": 1000},
                         "validate": {"samples_per_shard": 1000}})
t0 = time.perf_counter()
if mode == "kiln":
    from training.intake import ingest
    ingest.download(Path(url_list), out, params, ingest.policy_for(params, ("127.0.0.1/32",)))
elif mode == "i2d-same":
    from img2dataset import download

    from training.intake import ingest
    c = params.ingest
    download(url_list=url_list, input_format="parquet", url_col="url", caption_col="caption",
             output_format="webdataset", output_folder=str(out), image_size=size,
             resize_mode=ingest.img2dataset_resize_mode(c.resize_mode),
             encode_format="png", encode_quality=c.png_compression,
             processes_count=c.processes, thread_count=c.threads,
             number_sample_per_shard=1000, timeout=c.timeout_s, retries=c.retries,
             compute_hash="sha256", enable_wandb=False)
elif mode == "i2d-defaults":
    from img2dataset import download
    download(url_list=url_list, input_format="parquet", url_col="url", caption_col="caption",
             output_format="webdataset", output_folder=str(out), image_size=size,
             enable_wandb=False)
elif mode == "validate":
    from training.intake import validate
    validate.run(params, out, out.parent / "clean")
dt = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"seconds": dt, "n": n, "rss_mb": rss, "children_rss_mb": kids}))
"""


def child(mode: str, url_list: Path, out: Path, size: int, n: int) -> dict:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT), mode, str(url_list), str(out), str(size), str(n)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if r.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    import pandas as pd

    from training.intake.ingest import serve_directory

    n = args.n
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_photos(tmp / "site", n)
        rows = []
        with serve_directory(tmp / "site") as base:
            lst = tmp / "urls.parquet"
            pd.DataFrame(
                {
                    "url": [f"{base}/{i:06d}.jpg" for i in range(n)],
                    "caption": [f"photo {i}" for i in range(n)],
                }
            ).to_parquet(lst)
            for size in (32, 256):
                for mode in ("kiln", "i2d-same", "i2d-defaults"):
                    out = tmp / f"{mode}-{size}"
                    r = child(mode, lst, out / "shards", size, n)
                    rows.append((f"ingest {size} px", mode, n / r["seconds"], r))
                    if not (mode == "kiln" and size == 32):
                        with contextlib.suppress(FileNotFoundError):
                            import shutil

                            shutil.rmtree(out)
            r = child("validate", lst, tmp / "kiln-32", 32, n)
            rows.append(("validate 32 px", "kiln", n / r["seconds"], r))
            # 10x: repeat the list ten times under distinct query strings (distinct URLs,
            # same bytes: the exact-duplicate check rejects them, which is work too)
            big = tmp / "urls10.parquet"
            pd.DataFrame(
                {
                    "url": [f"{base}/{i % n:06d}.jpg?copy={i // n}" for i in range(10 * n)],
                    "caption": [f"photo {i}" for i in range(10 * n)],
                }
            ).to_parquet(big)
            r10 = child("kiln", big, tmp / "kiln10-32" / "shards", 32, 10 * n)
            rows.append(("ingest 32 px, 10x", "kiln", 10 * n / r10["seconds"], r10))
            v10 = child("validate", big, tmp / "kiln10-32", 32, 10 * n)
            rows.append(("validate 32 px, 10x", "kiln", 10 * n / v10["seconds"], v10))
    print(f"\n{n} source images, 512x384 JPEG, loopback HTTP, {os.cpu_count()} cores\n")
    print("| what | how | items/s | seconds | peak RSS MB (self / workers) |")
    print("|---|---|---:|---:|---:|")
    for what, mode, rate, r in rows:
        print(
            f"| {what} | {mode} | {rate:.0f} | {r['seconds']:.1f} | "
            f"{r['rss_mb']:.0f} / {r['children_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
