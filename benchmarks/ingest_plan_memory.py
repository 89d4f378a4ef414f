"""Memory and time of ingest's planning on a large URL list (no download).

Usage (from the repository root; under a minute of one core at 1M rows):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ingest_plan_memory.py [--rows 1000000]

Writes a normalised URL list of ``--rows`` loopback URLs (``urls.parquet``, as
``sources.normalize_url_list`` leaves it) in a temporary folder, then, in a fresh
process, runs ingest's URL-list path (``ingest._ingest``) with img2dataset's download
and the publishing replaced by no-ops: what is measured is reading the list, the row
ids, the plan against the (empty) base and writing ``fetch.parquet``. Prints the
seconds, the process's peak RSS, and its RSS before planning, so the difference is
the planning's own memory.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import resource, sys, time
from pathlib import Path
import pyarrow, pyarrow.parquet
from training import config
from training.intake import ingest
from training.intake.kinds.base import Prepared

work = Path(sys.argv[1])
params = config.resolve({"ingest": {"dataset": "url-list", "source": str(work / "urls.parquet")}})
kind = ingest.SOURCE_KINDS["url-list"]
kind.prepare = lambda params, work_dir: Prepared(url_list=work / "urls.parquet")
ingest.download = lambda *a, **k: None
ingest.publish = lambda *a, **k: None
def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
before = rss_kb()
t0 = time.perf_counter()
ingest._ingest(params, work / "raw", work)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = pyarrow.parquet.ParquetFile(work / "fetch.parquet").metadata.num_rows
print(f"planned {rows} rows to fetch in {dt:.1f} s; RSS before {before / 1024:.0f} MB, "
      f"peak {peak / 1024:.0f} MB (+{(peak - before) / 1024:.0f} MB)")
"""


def write_list(path: Path, rows: int) -> None:
    """``rows`` loopback URLs with captions, written 100k rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("url", pa.string()), ("caption", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, 100_000):
            n = range(start, min(rows, start + 100_000))
            urls = [f"http://127.0.0.1:8000/images/{i:08d}.jpg" for i in n]
            caps = [f"a picture of thing number {i}" for i in n]
            writer.write_table(pa.table({"url": urls, "caption": caps}, schema=schema))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_list(Path(tmp) / "urls.parquet", args.rows)
        subprocess.run([sys.executable, "-c", CHILD, tmp], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
