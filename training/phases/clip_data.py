"""CLIP's data: splits of image-caption pairs, with the captions tokenized once per split.

Why the token table: tokenizing a batch's captions was almost half of the streaming
loader's work in the CLIP stage (2.3 of 5.3 ms for 128 pairs, HF's fast tokenizer), and
on a 2-core CPU the loader's work comes out of the training step's time
(benchmarks/RESULTS.md, "Data engine"). The captions and the tokenizer do not change
during the stage, so each caption is tokenized once, before training, and a batch reads
its rows by sample id.

The table is one fixed-width row per sample in the split's canonical order, on disk and
read with ``pread`` like the shards (a 10 M-pair split at SD's 77 tokens is 1.5 GB:
not a thing to hold in RAM). Its name carries a digest of the split's index, the
tokenizer and the context, so a resumed stage reuses it and anything else rebuilds it.
Building it is one pass over the text members (the images are not read).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from training.config import Params
from training.engine import loaders
from training.engine.images import caption, center_square, decode_image
from training.inference.text import encode_text

CHUNK = 4096  # captions tokenized at a time while building


class TokenTable:
    """Rows of token ids by global sample id, read from the table's file."""

    def __init__(self, path: Path, width: int, dtype: np.dtype):
        self.path, self.width, self.dtype = path, width, np.dtype(dtype)
        self.row = width * self.dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)

    def rows(self, ids: list[int]) -> np.ndarray:
        """The rows of these sample ids, as int64 (the model's input ids)."""
        out = np.empty((len(ids), self.width), self.dtype)
        for j, i in enumerate(ids):
            out[j] = np.frombuffer(os.pread(self.fd, self.row, i * self.row), self.dtype)
        return out.astype(np.int64)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def tokenizer_digest(tokenizer) -> str:
    """What makes ``tokenizer``'s ids: its vocabulary, merges, text handling and context.
    A CLIP checkpoint is fingerprinted with it too (``clip._train``): a Kiln that trains
    another tokenizer from the same captions (new merges shift the ids) must not resume,
    nor take as finished, the weights of the old ids."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    for state in ("truncation", "padding"):  # set by each call, not part of the tokenizer
        backend.pop(state, None)
    h = hashlib.sha256(json.dumps(backend, sort_keys=True).encode())
    h.update(f"\0{tokenizer.model_max_length}".encode())
    return h.hexdigest()


def table_path(directory: Path, split: loaders.Split, tokenizer) -> Path:
    """Where the table of this split and tokenizer lives (content-addressed)."""
    h = hashlib.sha256()
    for part in (split.index.fingerprint(), tokenizer_digest(tokenizer)):
        h.update(part.encode())
        h.update(b"\0")
    return Path(directory) / f"tokens-{h.hexdigest()[:20]}.tokens"  # raw rows, not weights


def token_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if len(tokenizer) <= 2**16 else np.int32)


def build(source: str, tokenizer, directory: Path) -> TokenTable:
    """The table of ``source``'s captions, built here unless a complete one is there.

    A caption that cannot be read is stood in for as the loader does (the next readable
    sample's), so every row is filled; the training loader replaces that sample too."""
    from tqdm.auto import tqdm

    split = loaders.Split(source, caption, lambda caps: {"caps": caps}, members=("txt",))
    try:
        path = table_path(directory, split, tokenizer)
        dtype, width = token_dtype(tokenizer), tokenizer.model_max_length
        size = len(split) * width * dtype.itemsize
        if not (path.exists() and path.stat().st_size == size):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            bar = tqdm(desc="train_clip: tokenizing captions", total=len(split), unit="caption",
                       mininterval=5)  # fmt: skip
            with open(tmp, "wb") as f, bar:
                for ids in split.ranges(CHUNK):
                    caps = split.take(ids)["caps"]
                    f.write(encode_text(tokenizer, caps, tensors="np").astype(dtype).tobytes())
                    bar.update(len(caps))
            os.replace(tmp, path)  # complete or absent: a killed build is redone
            for old in path.parent.glob("tokens-*.tokens"):  # other data or tokenizer
                if old != path:
                    old.unlink(missing_ok=True)
        return TokenTable(path, width, dtype)
    finally:
        split.close()


def pair_split(params: Params, source: str, tokenizer, tokens: Path | None = None):
    """A split of image-caption pairs as ``{"px", "ids"}`` batches. With ``tokens`` (a
    directory for the token table, ``clip_tokens``): for training, in the stage's batch
    order, with the captions tokenized once up front. Without: read in order, captions
    tokenized per batch (the val split: read once)."""
    size, c = params.ingest.image_size, params.train_clip
    sizes = params.image_sizes()

    if tokens is not None:
        from training.intake.shards import IMAGE_EXTS

        table = build(source, tokenizer, tokens)

        def decode_id(sample: dict) -> tuple[np.ndarray, int]:
            # the vision tower is square: a bucketed image gives its centre square
            return center_square(decode_image(sample, sizes), size), sample["__id__"]

        def collate_rows(pairs: list) -> dict[str, np.ndarray]:
            return {
                "px": np.stack([p for p, _ in pairs]),  # uint8; the step makes floats
                "ids": table.rows([i for _, i in pairs]),
            }

        # centre squares: every sample one shape, so batches need not keep to a bucket
        split = loaders.make(
            c.loader,
            source,
            decode_id,
            collate_rows,
            c.batch_size,
            params.seed,
            c.block_shards,
            by_bucket=False,
            with_ids=True,
            members=IMAGE_EXTS,
        )  # fmt: skip (members: the text is in the table)
        split.on_close(table.close)
        return split

    def decode(sample: dict) -> tuple[np.ndarray, str]:
        return center_square(decode_image(sample, sizes), size), caption(sample)

    local = threading.local()  # a tokenizer per thread: a shared one is not thread-safe

    def collate(pairs: list) -> dict[str, np.ndarray]:
        if not hasattr(local, "tok"):
            local.tok = copy.deepcopy(tokenizer)
        return {
            "px": np.stack([p for p, _ in pairs]),
            "ids": encode_text(local.tok, [t for _, t in pairs], tensors="np").astype(np.int64),
        }

    return loaders.Split(source, decode, collate, by_bucket=False)


def captions_of(source: str, limit: int, seed: int) -> Iterator[str]:
    """The tokenizer's training text: every caption of the split if it has at most
    ``limit``, else the captions of a seeded sample of whole shards holding at least
    ``limit``. Only the text members are read, and nothing is kept in memory."""
    split = loaders.Split(source, caption, lambda caps: {"caps": caps}, members=("txt",))
    try:
        ids = np.arange(len(split))
        if len(split) > limit:
            pick = np.random.default_rng(seed).permutation(len(split.index.shards))
            counts = np.array(split.index.lengths)[pick]
            chosen = np.sort(pick[: int(np.searchsorted(np.cumsum(counts), limit)) + 1])
            starts = split.order.starts
            ids = np.concatenate(
                [
                    np.arange(starts[s], starts[s] + counts_s)
                    for s, counts_s in ((s, split.index.lengths[s]) for s in chosen)
                ]
            )
        for lo in range(0, len(ids), 1024):
            yield from split.take(ids[lo : lo + 1024])["caps"]
    finally:
        split.close()
