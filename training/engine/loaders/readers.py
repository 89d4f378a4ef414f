"""Random access to one shard's samples: webdataset tars and safetensors row files.

Both read with ``os.pread`` at offsets found once when the shard is opened, never
through a memory map: a mapped page a process touches counts in its RSS, so reading
shards through maps made a stage's RSS grow with the number of shards open (measured:
``benchmarks/RESULTS.md``, "Data engine"). ``pread`` goes through the page cache,
which is the kernel's to keep or drop, and it is safe from many threads at once.

* ``.tar`` (the clean images): the member index comes from Python's ``tarfile``
  (headers only), grouped into samples by webdataset's key rule (``wids``); sample
  ``i`` is ``{"__key__": key, ext: bytes, ...}``. Only image, text and JSON members are
  returned: a pickled member (``.pyd``, ``.pth``, ...) makes the sample unreadable
  instead of being loaded.
* ``.safetensors`` (the latents): each tensor's rows are located from the file's own
  header; sample ``i`` is ``{name: row i}``.

A shard that cannot be opened (truncated, not a tar, a wrong sample count) raises
``CorruptShard`` with the reason; the loader skips it and counts it. A file that is
gone (evicted from the cache) raises ``FileNotFoundError``: the loader fetches it again.
Any other ``OSError`` (EIO, ESTALE, EMFILE, ...) says nothing about the data: it passes
through, and the loader tries again a few times (``retrying``), then stops the stage
with ``ShardUnreachable``. Found in review: taken for a corrupt shard, a moment's I/O
error dropped a good shard for the rest of the run. An object store that did not answer
(``StoreUnreachable``) is not tried again here: boto3 has retried it already, and its
message names the object once (wrapped, it named it twice).
"""

from __future__ import annotations

import errno
import json
import os
import struct
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from training.console import say
from training.disk import DiskFull
from training.intake.store import CorruptShard
from training.intake.store_errors import StoreUnreachable

T = TypeVar("T")
RETRY_DELAYS = (0.2, 1.0, 5.0)  # seconds before the second, third and fourth try


class ShardUnreachable(OSError):
    """Reading a shard failed with an I/O error on every try: the storage is failing,
    not the data, so the shard is not skipped. An ``OSError`` with a one-line message
    (the stage prints it as one line; the flow retries the stage when its errno says
    the failure may pass)."""

    def __init__(self, message: str, code: int | None):
        super().__init__(message)  # one argument: str() is the message
        self.errno = code if code is not None else errno.EIO


def retrying(what: str, read: Callable[[], T], again: Callable[[], None] | None = None) -> T:
    """``read()``, tried again after an ``OSError`` (``again()`` first: e.g. reopen the
    file, which an ESTALE handle needs) up to ``len(RETRY_DELAYS)`` times, then
    ``ShardUnreachable``. A missing file passes through (the loader fetches it again),
    and so does a full cache disk (``DiskFull``: its own one-line error; no wait frees
    it) and a store that did not answer boto3's own retries (``StoreUnreachable``)."""
    tries = 0
    while True:
        try:
            return read()
        except (FileNotFoundError, ShardUnreachable, DiskFull, StoreUnreachable):
            raise
        except OSError as exc:
            if tries == len(RETRY_DELAYS):
                raise ShardUnreachable(
                    f"{what}: {exc.strerror or exc} on {tries + 1} tries; the storage is "
                    "failing, not the shard (it was not skipped): fix it and re-run, the "
                    "stage resumes from its last checkpoint",
                    exc.errno,
                ) from exc
            delay, tries = RETRY_DELAYS[tries], tries + 1
            say(f"loader: {what}: {exc}; trying again in {delay:g} s")
            time.sleep(delay)
            if again is not None:
                again()


_SAFE_EXTS = {"png", "jpg", "jpeg", "webp", "txt", "json"}
_UNSAFE_EXTS = {"pyd", "pickle", "pkl", "pth", "pt"}
_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "U8": np.uint8,
}


class _File:
    def __init__(self, path: Path):
        self.name = path.name
        self.fd = os.open(path, os.O_RDONLY)  # FileNotFoundError passes through
        self.size = os.fstat(self.fd).st_size

    def read(self, start: int, n: int, what: str) -> bytes:
        data = os.pread(self.fd, n, start)
        if len(data) != n:
            raise CorruptShard(f"{self.name}: {what} is cut short (truncated shard)")
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class TarShard(_File):
    def __init__(self, path: Path, nsamples: int):
        from wids.wids import group_by_key, splitname

        super().__init__(path)
        try:
            with tarfile.open(path, "r:") as tf:
                members = [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
        except OSError:  # the storage, not the data (FileNotFoundError: evicted)
            self.close()
            raise
        except (tarfile.TarError, EOFError) as exc:
            self.close()
            raise CorruptShard(
                f"{path.name}: not a readable tar ({type(exc).__name__}: {exc})"
            ) from None
        groups = group_by_key([name for name, _, _ in members])
        if len(groups) != nsamples:
            self.close()
            raise CorruptShard(f"{path.name}: {len(groups)} samples, the index says {nsamples}")
        # The member table as flat arrays, not a Python object per member: an open
        # shard's index costs ~20 bytes a member instead of ~200 (up to 34 shards of
        # 10,000 samples stay open per split). Sample i's members are rows
        # first[i]:first[i+1] of (ext code, offset, size).
        exts: dict[str, int] = {}
        keys, codes, offsets, sizes, first = [], [], [], [], [0]
        for group in groups:
            for m in group:
                fname, offset, size = members[m]
                key, dotted = splitname(fname)
                codes.append(exts.setdefault(dotted[1:], len(exts)))
                offsets.append(offset)
                sizes.append(size)
            keys.append(key)
            first.append(len(codes))
        self.exts = list(exts)
        encoded = [k.encode("utf-8", "surrogateescape") for k in keys]  # one blob
        self._keys = b"".join(encoded)
        self._key_at = np.cumsum([0] + [len(k) for k in encoded], dtype=np.int64)
        self.codes = np.array(codes, dtype=np.uint32)
        self.offsets = np.array(offsets, dtype=np.int64)
        self.sizes = np.array(sizes, dtype=np.int64)
        self.first = np.array(first, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.first) - 1

    def key(self, i: int) -> str:
        return self._keys[self._key_at[i] : self._key_at[i + 1]].decode("utf-8", "surrogateescape")

    def get(self, i: int, members: frozenset[str] | None = None) -> dict:
        """Sample ``i``: its key and its image/text/JSON members (``members``: only
        those extensions)."""
        key = self.key(i)
        sample: dict = {"__key__": key}
        lo, hi = int(self.first[i]), int(self.first[i + 1])
        for code, offset, size in zip(
            self.codes[lo:hi].tolist(),
            self.offsets[lo:hi].tolist(),
            self.sizes[lo:hi].tolist(),
            strict=True,
        ):
            ext = self.exts[code]
            if ext in _UNSAFE_EXTS:
                raise CorruptShard(f"{self.name}: {key}.{ext}: refusing an unsafe (pickled) member")
            if ext in _SAFE_EXTS and (members is None or ext in members):
                sample[ext] = self.read(offset, size, f"{key}.{ext}")
        return sample


class TensorShard(_File):
    def __init__(self, path: Path, nsamples: int):
        super().__init__(path)
        try:
            (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            header = json.loads(os.pread(self.fd, n, 8))
            # name -> (offset of row 0, bytes per row, dtype, row shape)
            self.arrays: dict[str, tuple[int, int, np.dtype, tuple[int, ...]]] = {}
            rows = set()
            for name, spec in header.items():
                if name == "__metadata__":
                    continue
                begin, end = spec["data_offsets"]
                dtype, shape = np.dtype(_DTYPES[spec["dtype"]]), tuple(spec["shape"])
                row_bytes = (end - begin) // max(1, shape[0])
                self.arrays[name] = (8 + n + begin, row_bytes, dtype, shape[1:])
                rows.add(shape[0])
                if 8 + n + end > self.size:
                    raise ValueError(f"tensor {name!r} runs past the end of the file")
        except OSError:  # the storage, not the data
            self.close()
            raise
        except (ValueError, KeyError, struct.error) as exc:
            self.close()
            raise CorruptShard(f"{path.name}: not a readable safetensors file ({exc})") from None
        if rows != {nsamples}:
            self.close()
            raise CorruptShard(f"{path.name}: {sorted(rows)} rows, the index says {nsamples}")

    def get(self, i: int, members: frozenset[str] | None = None) -> dict:
        out = {}
        for name, (base, row_bytes, dtype, shape) in self.arrays.items():
            if not members or name in members:
                data = self.read(base + i * row_bytes, row_bytes, f"row {i} of {name}")
                out[name] = np.frombuffer(data, dtype=dtype).reshape(shape)
        return out


def open_shard(path: Path, nsamples: int) -> TarShard | TensorShard:
    if path.suffix == ".tar":
        return TarShard(path, nsamples)
    if path.suffix == ".safetensors":
        return TensorShard(path, nsamples)
    raise CorruptShard(f"{path.name}: unknown shard type {path.suffix!r}")
