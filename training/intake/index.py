"""A split on disk or in object storage: a directory of shards plus ``index.json``.

The index is webdataset's ``wids`` dataset descriptor (``wids_version: 1``, a
``shardlist`` of ``{url, nsamples, filesize}``, URLs relative to the index), so any
``wids.ShardListDataset`` reads a Kiln split too. Kiln adds each shard's ``sha256``: the
local cache stores shards by content, so a re-published split can never be served from
stale cached bytes, and a download is verified before it is used.

Writers (``validate``'s clean shards, ``precompute_latents``' latent shards) call
``write_index`` once their shards are complete; readers get the split's shards with
their sizes without opening any of them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

INDEX = "index.json"


@dataclass(frozen=True)
class ShardEntry:
    url: str  # relative to the index's directory
    nsamples: int
    filesize: int
    sha256: str
    bucket: str | None = None  # "WxH" in a split of aspect-ratio buckets (intake.buckets)


@dataclass(frozen=True)
class SplitIndex:
    base: str  # the split's directory: a local path or an s3:// prefix, no trailing /
    shards: tuple[ShardEntry, ...]

    @property
    def lengths(self) -> list[int]:
        return [s.nsamples for s in self.shards]

    @property
    def groups(self) -> list[int] | None:
        """Each shard's bucket number (first-seen order), or None: one bucket."""
        names = [s.bucket for s in self.shards]
        if len(set(names)) <= 1:
            return None
        first = {b: i for i, b in enumerate(dict.fromkeys(names))}
        return [first[b] for b in names]

    def blocks_in_use(self, bucketed: bool = True) -> int:
        """Shuffle blocks a reader holds at once: two (the one being read and the next),
        and when batches keep to aspect-ratio buckets, two per bucket (each bucket reads
        its own blocks in turn; was budgeted one per bucket plus one, and an epoch of a
        3-bucket split at that size downloaded 1.17x its shards)."""
        return 2 * len(self.buckets()) if bucketed and self.groups else 2

    def buckets(self) -> list[str | None]:
        """The split's buckets, in shard order."""
        return list(dict.fromkeys(s.bucket for s in self.shards))

    def url(self, i: int) -> str:
        return f"{self.base}/{self.shards[i].url}"

    def fingerprint(self) -> str:
        """What identifies the split's content (checkpoints resume only into the same)."""
        return hashlib.sha256("".join(s.sha256 for s in self.shards).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def mismatch(path: Path, entry: ShardEntry) -> str | None:
    """Why the file at ``path`` is not the shard ``entry`` names (missing, another size,
    another sha256), or None when it is. Size first: a file cut short is told without
    reading it."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != entry.filesize:
        return f"{size} bytes where the index says {entry.filesize}"
    if file_sha256(path) != entry.sha256:
        return "its sha256 is not the index's"
    return None


def write_index(
    directory: Path, counts: dict[str, int], name: str, buckets: dict[str, str] | None = None
) -> Path:
    """Write ``directory/index.json`` for the shards named in ``counts`` (file name ->
    samples), in sorted name order: the canonical order of the split's samples.
    ``buckets`` (file name -> "WxH") marks a split in aspect-ratio buckets; only the
    shards of a split with more than one bucket carry it."""
    from training.disk import write_json

    shardlist = []
    for fname in sorted(counts):
        path = directory / fname
        entry = {
            "url": fname,
            "nsamples": counts[fname],
            "filesize": path.stat().st_size,
            "sha256": file_sha256(path),
        }
        if buckets and len(set(buckets.values())) > 1:
            entry["bucket"] = buckets[fname]
        shardlist.append(entry)
    path = directory / INDEX
    write_json(path, {"wids_version": 1, "name": name, "shardlist": shardlist})
    return path


def parse_index(text: str, base: str, where: str) -> SplitIndex:
    """The index's shards; ``where`` names the index in errors."""
    try:
        desc = json.loads(text)
        shards = tuple(
            ShardEntry(
                str(s["url"]),
                int(s["nsamples"]),
                int(s["filesize"]),
                str(s["sha256"]),
                str(s["bucket"]) if s.get("bucket") else None,
            )
            for s in desc["shardlist"]
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{where}: not a Kiln split index ({exc!r})") from None
    if desc.get("wids_version") != 1:
        raise ValueError(f"{where}: unknown index version {desc.get('wids_version')!r}")
    if not shards:
        raise ValueError(f"{where}: the split has no shards")
    return SplitIndex(base=base.rstrip("/"), shards=shards)
