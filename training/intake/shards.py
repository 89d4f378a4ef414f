"""Webdataset shard I/O shared by every phase: one place that reads and writes samples.

A sample is ``{"__key__": str, "png"/"jpg": bytes, "txt": caption, "json": metadata}``,
the layout img2dataset writes. Reading never unpickles: only image, text and JSON
members are decoded (``.pyd``/``.pickle`` members are refused), and ``pipe:`` URLs are
not accepted.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
UNSAFE_EXTS = ("pyd", "pickle", "pkl", "pth", "pt")
# Every member of every tar Kiln writes gets this mtime (webdataset's TarWriter would
# stamp the current time; its user/group "bigdata", uid/gid 0 and mode 0o444 are fixed
# already), so the same samples always make the same bytes: DVC then hashes two fresh
# runs alike and re-runs nothing downstream for a timestamp.
TAR_MTIME = 0
# webdataset's own rule for a member's sample key: the path up to the first dot of the
# file name (``dir/0001.seg.png`` -> key ``dir/0001``, extension ``seg.png``)
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclass
class Record:
    key: str
    image_bytes: bytes
    image_ext: str
    caption: str
    meta: dict
    shard: str = ""  # the tar it came from

    def image(self) -> Image.Image:
        return Image.open(io.BytesIO(self.image_bytes)).convert("RGB")


# The rejects table (``rejects.parquet`` of ingest and of validate): one row per sample
# that did not make it, the stage that dropped it and why; ``failed_checks`` lists the
# quality checks it failed (empty for ingest's). Validate's table carries ingest's rows.
REJECT_COLUMNS = ("key", "url", "caption", "stage", "reason", "failed_checks")


def rejects_schema():
    import pyarrow as pa

    return pa.schema([(n, pa.string()) for n in REJECT_COLUMNS])


def shard_paths(directory: str | Path) -> list[Path]:
    paths = sorted(Path(directory).glob("*.tar"))
    if not paths:
        raise FileNotFoundError(f"no .tar shards in {directory}")
    return paths


def read(paths: Iterable[str | Path], split: bool = False) -> Iterator[Record]:
    """Stream records from local tar shards in order (deterministic, no shuffling).

    By default every process reads every shard: the training phases index samples by
    (seed, step) and each data-parallel rank takes its slice of the batch
    (``engine.distributed.local``). ``split=True`` is for stages that stream each sample once
    (``precompute_latents``): webdataset's ``split_by_node`` gives rank r of N the
    shards r, r+N, ..., and inside a ``DataLoader`` worker ``split_by_worker`` deals
    those out again, so every shard is read by exactly one worker of one process."""
    import webdataset as wds

    urls = [str(p) for p in paths]
    for url in urls:
        if url.startswith("pipe:"):
            raise ValueError(f"refusing pipe: URL {url!r}")
    every_shard = lambda urls: urls  # noqa: E731 - webdataset wants a callable
    dataset = wds.WebDataset(
        urls,
        shardshuffle=False,
        empty_check=False,
        nodesplitter=wds.split_by_node if split else every_shard,
        workersplitter=wds.split_by_worker if split else every_shard,
    )
    for sample in dataset:
        exts = {k for k in sample if not k.startswith("__")}
        bad = exts & set(UNSAFE_EXTS)
        if bad:
            raise ValueError(f"{sample['__key__']}: refusing to load unsafe members {sorted(bad)}")
        img_ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if img_ext is None:
            continue
        caption = sample.get("txt", b"")
        meta = sample.get("json", b"{}")
        yield Record(
            key=str(sample["__key__"]),
            image_bytes=bytes(sample[img_ext]),
            image_ext=img_ext,
            caption=caption.decode("utf-8", errors="replace")
            if isinstance(caption, bytes)
            else str(caption),
            meta=json.loads(meta) if meta else {},
            shard=str(sample.get("__url__", "")),
        )


def tar_writer(path: str | Path):
    """A webdataset ``TarWriter`` whose output depends only on what is written to it."""
    import webdataset as wds

    return wds.TarWriter(str(path), mtime=TAR_MTIME)


def sort_tar(
    src: str | Path,
    dst: str | Path,
    edit: Callable[[str, bytes], bytes] | None = None,
    rename: Callable[[str], str | None] | None = None,
) -> int:
    """Rewrite the webdataset tar ``src`` as ``dst``: samples in key order, members with
    fixed metadata (``tar_writer``), ``edit(extension, data)`` applied to each member;
    ``rename(key)`` gives a sample's new key, or None to leave it out.

    img2dataset's thread pool writes samples in the order their downloads finish, so
    two runs over one source would otherwise give differently ordered (and differently
    stamped) shards. Reads the tar's member index, then one sample at a time, so memory
    does not grow with the shard. Sorting a sorted tar gives the same bytes, so it is
    safe to repeat after an interruption. Returns the number of samples."""
    with tarfile.open(src, "r") as tf:
        samples: dict[str, list[tuple[str, tarfile.TarInfo]]] = {}
        for m in tf:
            match = _KEY_EXT.match(m.name) if m.isfile() else None
            if match:
                samples.setdefault(match.group(1), []).append((match.group(2), m))
        kept = {k: rename(k) if rename is not None else k for k in samples}
        with tar_writer(dst) as w:
            for key in sorted(k for k in samples if kept[k] is not None):
                sample: dict = {"__key__": kept[key]}
                for ext, m in samples[key]:
                    fh = tf.extractfile(m)
                    data = fh.read() if fh is not None else b""
                    sample[ext] = edit(ext, data) if edit is not None else data
                w.write(sample)
    return sum(v is not None for v in kept.values())


class ShardWriter:
    """Writes records to ``{prefix}-%05d.tar``; each shard is written to a temp name and
    renamed when complete, so a crash never leaves a partial shard under a final name."""

    def __init__(
        self, directory: str | Path, prefix: str, per_shard: int, write_index: bool = True
    ):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.per_shard = prefix, per_shard
        self.write_index = write_index
        self.index, self.count, self.total = 0, 0, 0
        self.counts: dict[str, int] = {}  # finished shard -> samples (for index.json)
        self._tar = None
        self._tmp: Path | None = None

    def _open(self) -> None:
        self._tmp = self.dir / f".{self.prefix}-{self.index:05d}.tar.tmp"
        self._tar = tar_writer(self._tmp)

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = self.dir / f"{self.prefix}-{self.index:05d}.tar"
        with open(self._tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self._tmp, final)
        self.counts[final.name] = self.count
        self._tar, self.index, self.count = None, self.index + 1, 0

    def write(self, rec: Record) -> None:
        if self._tar is None:
            self._open()
        self._tar.write(
            {
                "__key__": rec.key,
                rec.image_ext: rec.image_bytes,
                "txt": rec.caption.encode("utf-8"),
                "json": json.dumps(rec.meta, sort_keys=True).encode("utf-8"),
            }
        )
        self.count += 1
        self.total += 1
        if self.count >= self.per_shard:
            self._close()

    def close(self) -> int:
        """Finish the last shard and write the split's ``index.json`` (the training
        loaders' view of it: shards, sample counts, sizes, checksums)."""
        from training.intake.index import write_index

        self._close()
        if self.counts and self.write_index:
            write_index(self.dir, self.counts, self.prefix)
        return self.total

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        elif self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)


class BucketWriter:
    """A split in aspect-ratio buckets (``intake.buckets``): one ``ShardWriter`` per
    bucket in one directory, so every shard holds one bucket. The square bucket's shards
    are ``{prefix}-%05d.tar``, the others' ``{prefix}-b{W}x{H}-%05d.tar``: in name order,
    the split's canonical order, each bucket's shards are contiguous. One ``index.json``
    names each shard's bucket (when there is more than one)."""

    def __init__(self, directory: str | Path, prefix: str, per_shard: int, square: str):
        self.dir, self.prefix, self.per_shard, self.square = (
            Path(directory),
            prefix,
            per_shard,
            square,
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writers: dict[str, ShardWriter] = {}

    def write(self, rec: Record, bucket: str) -> None:
        w = self.writers.get(bucket)
        if w is None:
            name = self.prefix if bucket == self.square else f"{self.prefix}-b{bucket}"
            w = self.writers[bucket] = ShardWriter(self.dir, name, self.per_shard, False)
        w.write(rec)

    @property
    def total(self) -> int:
        return sum(w.total for w in self.writers.values())

    def sizes(self) -> dict[str, int]:
        """Samples per bucket."""
        return {b: w.total for b, w in sorted(self.writers.items())}

    def close(self) -> int:
        from training.intake.index import write_index

        counts, buckets = {}, {}
        for bucket, w in self.writers.items():
            w.close()
            counts.update(w.counts)
            buckets.update(dict.fromkeys(w.counts, bucket))
        if counts:
            write_index(self.dir, counts, self.prefix, buckets)
        return self.total

    def __enter__(self) -> BucketWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            for w in self.writers.values():
                w.__exit__(*exc)


def load_images(directory: str | Path) -> tuple[np.ndarray, list[str]]:
    """All images of a split as uint8 ``[N, H, W, 3]`` plus captions (small sets only)."""
    images, captions = [], []
    for rec in read(shard_paths(directory)):
        images.append(np.asarray(rec.image(), dtype=np.uint8))
        captions.append(rec.caption)
    return np.stack(images), captions
