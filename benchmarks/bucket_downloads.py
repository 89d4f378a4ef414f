"""Shard downloads of one streamed epoch of a split in aspect-ratio buckets, by cache size.

Usage (from the repository root; a moto S3 server runs on a loopback port meanwhile):
    .venv/bin/python benchmarks/bucket_downloads.py [--buckets 3] [--shards 18]
        [--blocks 4 6 8] [--dir /tmp/kiln-bucket-downloads]

Writes a split of ``--buckets`` buckets (8x8, 16x8, 8x16, ...) of ``--shards`` shards of 10
samples each, uploads it to the S3 server, and streams one epoch (batches of 8, one shard
a block) through a shard cache of each ``--blocks`` size (in largest shards). Prints the
bytes downloaded against the split's, and the shards fetched twice within the epoch
beyond the next epoch's first blocks (fetched ahead at its end). ``check_fits`` asks for
two blocks a bucket.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from tests.conftest import free_port  # noqa: E402
from training.engine import loaders  # noqa: E402
from training.engine.images import caption, decode_image  # noqa: E402
from training.intake import buckets, shards  # noqa: E402
from training.intake import store as S  # noqa: E402

BUCKET = "kiln-bench"
SIDES = [(8, 8), (16, 8), (8, 16), (16, 16), (24, 8), (8, 24)]


def write_split(split: Path, n_buckets: int, n_shards: int) -> list[tuple[int, int]]:
    sizes = SIDES[:n_buckets]
    rng = np.random.default_rng(0)
    with shards.BucketWriter(split, "train", 10, "8x8") as w:
        for i in range(10 * n_shards * n_buckets):
            size = sizes[i % n_buckets]
            buf = io.BytesIO()
            px = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(px).save(buf, format="PNG")
            w.write(
                shards.Record(f"{i:06d}", buf.getvalue(), "png", f"n {i}", {}), buckets.name(size)
            )
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--buckets", type=int, default=3)
    ap.add_argument("--shards", type=int, default=18, help="shards a bucket")
    ap.add_argument("--blocks", type=int, nargs="+", default=[4, 6, 8])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/kiln-bucket-downloads"))
    a = ap.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True)
    split = a.dir / "train"
    sizes = write_split(split, a.buckets, a.shards)
    port = free_port()
    moto = Path(sys.executable).with_name("moto_server")
    server = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}", timeout=2).close()
                break
            except OSError:
                time.sleep(0.3)
        os.environ.update(
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
        )  # fmt: skip
        client = S.s3_client()
        client.create_bucket(Bucket=BUCKET)
        for f in split.iterdir():
            client.upload_file(str(f), BUCKET, f"train/{f.name}")
        files = sorted(split.glob("*.tar"))
        largest, total = max(f.stat().st_size for f in files), sum(f.stat().st_size for f in files)
        print(f"{a.buckets} buckets x {a.shards} shards, {total / 1e6:.2f} MB; budget "
              f"{2 * a.buckets} blocks")  # fmt: skip
        fetched: list[str] = []

        class Counted(S.Store):  # the real store, its downloads written down
            def _download(self, url, entry, local):
                fetched.append(entry.url)
                return super()._download(url, entry, local)

        for blocks in a.blocks:
            fetched.clear()
            store = Counted(a.dir / f"cache-{blocks}", blocks * largest)
            try:
                store.check_fits(store.index(f"s3://{BUCKET}/train"), 1)
            except S.UserError as exc:
                print(f"cache {blocks} blocks: refused ({exc})")
                continue
            stream = loaders.make(
                "stream", f"s3://{BUCKET}/train",
                lambda s: (decode_image(s, sizes), caption(s)),
                lambda xs: {"n": np.array([int(c.split()[-1]) for _, c in xs])},
                8, 0, 1, store,
            )  # fmt: skip
            o = stream.order
            for step in range(o.per_epoch):
                stream.batch(step)
            stream.close()
            ahead = {
                stream.index.shards[o.shards[b][s]].url
                for b in range(a.buckets)
                for s in o.orders[b]._layout(1)[0][0].tolist()
            }
            twice = {u for u in fetched if fetched.count(u) > 1} - ahead
            print(f"cache {blocks} blocks: {stream.downloaded / total:.2f}x the split's bytes, "
                  f"{len(twice)} shards fetched twice within the epoch")  # fmt: skip
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
