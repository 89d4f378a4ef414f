"""Random access to one shard's samples: webdataset tars and safetensors row files.

* ``.tar`` (the clean images): webdataset's indexed reader (``wids``) maps the file and
  indexes its members once; sample ``i`` is ``{"__key__": key, ext: bytes, ...}``. Only
  image, text and JSON members are returned: pickled members (``.pyd``, ``.pth``, ...)
  make the sample unreadable instead of being loaded.
* ``.safetensors`` (the latents): each tensor is memory-mapped from the file's own
  header (no copy of the shard in RAM); sample ``i`` is ``{name: row i}``.

A shard that cannot be opened (truncated, not a tar, a wrong sample count) raises
``CorruptShard`` with the reason; the loader skips it and counts it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from training.intake.store import CorruptShard

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


class TarShard:
    def __init__(self, path: Path, nsamples: int):
        from wids.wids import group_by_key, splitname
        from wids.wids_mmtar import MMIndexedTar

        try:
            self.tar = MMIndexedTar(str(path))
        except FileNotFoundError:
            raise  # not corrupt: gone from the cache (the loader fetches it again)
        except Exception as exc:
            raise CorruptShard(
                f"{path.name}: cannot index the tar ({type(exc).__name__}: {exc})"
            ) from None
        self.name = path.name
        members = self.tar.by_index
        groups = group_by_key([name for name, _, _ in members])
        if len(groups) != nsamples:
            self.close()
            raise CorruptShard(f"{path.name}: {len(groups)} samples, the index says {nsamples}")
        # per sample: its key and (extension, start, end) of each member, found once
        self.samples: list[tuple[str, list[tuple[str, int, int]]]] = []
        for group in groups:
            key, parts = "", []
            for m in group:
                fname, offset, size = members[m]
                key, dotted = splitname(fname)
                parts.append((dotted[1:], offset + 512, offset + 512 + size))
            self.samples.append((key, parts))
        self.mm = self.tar.mmapped_file

    def __len__(self) -> int:
        return len(self.samples)

    def get(self, i: int, members: frozenset[str] | None = None) -> dict:
        """Sample ``i``: its key and its image/text/JSON members (``members``: only
        those extensions)."""
        key, parts = self.samples[i]
        sample: dict = {"__key__": key}
        for ext, start, end in parts:
            if ext in _UNSAFE_EXTS:
                raise CorruptShard(f"{self.name}: {key}.{ext}: refusing an unsafe (pickled) member")
            if ext in _SAFE_EXTS and (members is None or ext in members):
                if end > len(self.mm):
                    raise CorruptShard(f"{self.name}: {key}.{ext} is cut short (truncated shard)")
                sample[ext] = self.mm[start:end]
        return sample

    def close(self) -> None:
        self.tar.close()


class TensorShard:
    def __init__(self, path: Path, nsamples: int):
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            self.arrays = {}
            for name, spec in header.items():
                if name == "__metadata__":
                    continue
                begin, _ = spec["data_offsets"]
                self.arrays[name] = np.memmap(
                    path,
                    dtype=_DTYPES[spec["dtype"]],
                    mode="r",
                    offset=8 + n + begin,
                    shape=tuple(spec["shape"]),
                )
        except FileNotFoundError:
            raise  # not corrupt: gone from the cache (the loader fetches it again)
        except (OSError, ValueError, KeyError, struct.error) as exc:
            raise CorruptShard(f"{path.name}: not a readable safetensors file ({exc})") from None
        counts = {len(a) for a in self.arrays.values()}
        if counts != {nsamples}:
            raise CorruptShard(f"{path.name}: {sorted(counts)} rows, the index says {nsamples}")
        self.name = path.name

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def get(self, i: int, members: frozenset[str] | None = None) -> dict:
        return {k: np.array(a[i]) for k, a in self.arrays.items() if not members or k in members}

    def close(self) -> None:
        self.arrays = {}


def open_shard(path: Path, nsamples: int) -> TarShard | TensorShard:
    if path.suffix == ".tar":
        return TarShard(path, nsamples)
    if path.suffix == ".safetensors":
        return TensorShard(path, nsamples)
    raise CorruptShard(f"{path.name}: unknown shard type {path.suffix!r}")
