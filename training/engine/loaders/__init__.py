"""Training data loaders: where a training phase's batches come from.

A split is a directory (or ``s3://`` prefix) of shards plus ``index.json`` (``index``).
A loader is made as ``make(name, source, decode, collate, batch_size, seed,
block_shards)`` and gives ``len(loader)``, ``loader.global_batch`` and
``loader.batch(step) -> {name: tensor}``: *this process's slice* of the global batch of
``step``. The global batch is a function of ``(seed, step)`` and the split alone
(``order.BlockOrder``), the same for any number of processes and loader threads, so a
resumed run needs no loader state and N processes make the same update as one. Each
training section of params.yaml picks a loader with ``loader``:

* ``stream`` (default): reads each batch from the shards on demand, locally or from
  object storage through a bounded cache (``stream``, ``store``);
* ``memory``: decodes the whole split into RAM once; the same batches, for comparison.

Adding a loader: one module here plus one entry in ``LOADERS`` (and its name in the
``Loader`` literal of ``training/config.py``).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from training.engine.images import caption
from training.engine.loaders.memory import InMemory
from training.engine.loaders.stream import Collate, Decode, Split, Streaming
from training.intake.shards import IMAGE_EXTS, Record
from training.intake.store import Store, split_source

LOADERS: dict[str, type[Split]] = {
    "stream": Streaming,
    "memory": InMemory,
}


def as_is(row: dict) -> dict:
    """``decode`` for rows that need none (safetensors rows: already arrays)."""
    return row


def stack_rows(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """``collate`` for rows of arrays: each name's rows stacked into one array."""
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def records(source: str, limit: int) -> list[Record]:
    """``limit`` samples of a split of clean shards as ``shards.Record``s: the ones a
    scan reads (``Split.picked``: spread over the split, each aspect-ratio bucket in
    proportion), for the measures that compare with N real images. ``shards.read``
    from the first shard on gives the square bucket's only."""
    split = Split(source, _record, list)
    try:
        return [r for batch in split.scan(256, limit) for r in batch]
    finally:
        split.close()


def _record(sample: dict) -> Record:
    """A raw sample as ``shards.read`` makes it (its image, caption and metadata)."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError(f"{sample['__key__']}: no image member")
    meta = json.loads(sample.get("json") or b"{}")
    return Record(sample["__key__"], bytes(sample[ext]), ext, caption(sample), meta)


def make(
    name: str,
    source: str,
    decode: Decode,
    collate: Collate,
    batch_size: int,
    seed: int,
    block_shards: int,
    store: Store | None = None,
    by_bucket: bool = True,
    with_ids: bool = False,
    members: tuple[str, ...] | None = None,
) -> Split:
    """``by_bucket=False``: one order over all buckets, for a ``decode`` that gives every
    sample one shape (CLIP's centre squares). ``with_ids``, ``members``: as ``Split``'s."""
    return LOADERS[name](
        source, decode, collate, batch_size, seed, block_shards, store,
        by_bucket=by_bucket, with_ids=with_ids, members=members,
    )  # fmt: skip


__all__ = [
    "LOADERS",
    "Collate",
    "Decode",
    "InMemory",
    "Split",
    "Store",
    "Streaming",
    "as_is",
    "make",
    "records",
    "split_source",
    "stack_rows",
]
