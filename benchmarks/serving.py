"""REST serving throughput and latency: ``mlflow models serve`` of kiln-text2image on
loopback, 1 and 8 concurrent clients.

Usage (from the project root; ~2 minutes on 2 cores):
    .venv/bin/python benchmarks/serving.py [--pipeline DIR] [--requests 48] [--steps 20]
        [--clients 1 8] [--concurrency 1 [8 ...]]

Without ``--pipeline`` it serves the random-weight pipeline with the tiny profile's
architectures that tests/test_serving.py builds (same compute as the trained tiny model;
the pictures are noise). Either way the pipeline is registered the way the evaluate stage
registers it, in a temporary MLflow store, and served as the registry's pyfunc. Each
request is one image (one row, its own seed, ``--steps`` steps, guidance 4). For each
client count, every client sends its share of ``--requests`` back to back; the figures
are images/s over the whole run and the p50/p95 of request latency. Each
``--concurrency`` value is a server of its own with that ``KILN_SERVE_CONCURRENCY`` (how
many requests compute at once; 2 is the default the model ships with).
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_serving import (  # noqa: E402
    CAPTIONS,
    build_tiny_pipeline,
    invoke,
    register,
    serve,
)


def measure(base: str, clients: int, requests: int, steps: int, seed0: int) -> dict:
    jobs = [[[CAPTIONS[k % len(CAPTIONS)], seed0 + k, steps, 4.0, ""]] for k in range(requests)]
    latencies: list[float] = []
    lock, start = threading.Lock(), threading.Barrier(clients)

    def client(c: int) -> None:
        start.wait(timeout=60)
        for k in range(c, requests, clients):
            t0 = time.perf_counter()
            status, body = invoke(base, jobs[k], timeout=300)
            dt = time.perf_counter() - t0
            assert status == 200, (status, str(body)[:300])
            assert base64.b64decode(body["predictions"][0]["image"])  # type: ignore[index]
            with lock:
                latencies.append(dt)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    lat = np.array(latencies)
    return {
        "clients": clients,
        "requests": requests,
        "images_per_s": requests / wall,
        "p50_s": float(np.percentile(lat, 50)),
        "p95_s": float(np.percentile(lat, 95)),
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipeline", type=Path, help="a saved StableDiffusionPipeline directory")
    ap.add_argument("--requests", type=int, default=48, help="requests per client count")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1], help="server settings")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pipeline = args.pipeline.resolve() if args.pipeline else build_tiny_pipeline(root)
        version = register(root, pipeline)
        print(
            f"pipeline: {args.pipeline or 'tiny random'}; {args.steps} steps, guidance 4, "
            "1 image per request; "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
            f"load average at start: {os.getloadavg()[0]:.1f}"
        )
        print("| KILN_SERVE_CONCURRENCY | clients | requests | images/s | p50 (s) | p95 (s) |")
        print("|---|---|---|---|---|---|")
        for conc in args.concurrency:
            env = {"KILN_SERVE_CONCURRENCY": str(conc)}
            with serve(root, version, root / f"serve-{conc}.log", env) as base:
                measure(base, 1, 4, args.steps, 0)  # warm-up: first calls allocate
                for i, clients in enumerate(args.clients):
                    r = measure(base, clients, args.requests, args.steps, 1000 * (i + 1))
                    print(
                        f"| {conc} | {clients} | {r['requests']} | {r['images_per_s']:.1f} | "
                        f"{r['p50_s']:.3f} | {r['p95_s']:.3f} |",
                        flush=True,
                    )
        print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
