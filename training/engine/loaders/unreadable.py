"""Buckets none of whose samples can be read, and which bucket draws for them.

A bad sample's stand-in comes from its own bucket, so that a batch keeps one shape. A
bucket with no readable sample at all (a small aspect-ratio bucket whose one shard is
truncated) has no stand-in to give: its steps would stop the run. Instead its batches,
and plain reads of it, are drawn from the largest readable bucket
(``order.substitute``), said once and counted (``loader_unreadable_buckets``).

A bucket is found unreadable when a stand-in walk has tried each of its samples
(``Unreadable``). That is a property of the data, not of the run's history: a resumed
run, or another rank (whose slice of that bucket's batch is all bad too), finds it at
the same step and draws the same substitute batch. Only a split with nothing left to
read stops, with a clear error.
"""

from __future__ import annotations

import threading

import numpy as np

from training.console import say
from training.errors import UserError


class Unreadable(Exception):
    """A stand-in walk tried every sample of a bucket and could read none."""

    def __init__(self, bucket: int):
        super().__init__(bucket)
        self.bucket = bucket


class UnreadableBuckets:
    """The buckets of ``order`` found unreadable so far, and where their reads go."""

    def __init__(self, order, buckets: list, source: str):
        self.order, self.names, self.source = order, buckets, source
        self.found: set[int] = set()
        self._lock = threading.Lock()

    def substitute(self, bad_shards: dict[str, str]) -> int:
        sub = self.order.substitute(self.found)
        if sub is None:
            raise UserError(
                f"{self.source}: none of its samples can be read (bad shards: "
                f"{', '.join(bad_shards) or 'none'}; bad samples are named above); "
                "re-create the split"
            )
        return sub

    def add(self, bucket: int, bad_shards: dict[str, str]) -> None:
        """Record a bucket with no readable sample (said once); stop if none is left."""
        with self._lock:
            if bucket in self.found:
                return
            self.found.add(bucket)
        sub = self.substitute(bad_shards)
        per = self.order.orders[bucket].per_epoch
        say(
            f"loader: no sample of aspect-ratio bucket {self.names[bucket]} of {self.source} "
            f"can be read (bad shards: {', '.join(bad_shards) or 'none'}); its {per} batches "
            f"an epoch, and reads of it, are drawn from bucket {self.names[sub]} instead"
        )

    def bucket(self, step: int, bad_shards: dict[str, str]) -> int:
        """The bucket ``step`` draws from: its own, or the substitute for an unreadable one."""
        b = self.order.bucket_of(step)
        return b if b not in self.found else self.substitute(bad_shards)

    def moved(self, ids: np.ndarray, bad_shards: dict[str, str]) -> np.ndarray:
        """Plain-read ids, those of unreadable buckets moved into the substitute bucket
        at the same offset (modulo its size)."""
        if not self.found:
            return ids
        out = ids.copy()
        for j, i in enumerate(ids.tolist()):
            g = self.order.group_of(i)
            if g in self.found:
                lo, _ = self.order.bucket_range(g)
                slo, shi = self.order.bucket_range(self.substitute(bad_shards))
                out[j] = slo + (i - lo) % (shi - slo)
        return out
