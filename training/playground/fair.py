"""The playground's waiting jobs in a fair order: round-robin across clients.

Found in review: the queue was first come, first served, so one client that queued
eight jobs made every other client wait behind all eight. Now each client's jobs are
numbered by round (a client's first waiting job is in the next round, its second in the
one after, ...) and the worker takes the lowest round first, arrivals in order within
a round: a client with one job waits behind at most one job of each other client (and
the one running), however many they queued.

A client is the address a request comes from (``app.py``): the playground has no login,
so that is the one thing a client cannot change at will. A client may keep at most
``max_per_client`` jobs waiting, so one client cannot fill the whole queue and turn
everyone else away with "busy".

Not thread-safe on its own: the worker calls it under its lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class Busy(Exception):
    """The queue, or this client's share of it, is full: try again later (HTTP 429)."""


@dataclass(order=True)
class _Entry:
    round: int
    arrival: int
    client: str = field(compare=False)
    job: Any = field(compare=False)


class FairQueue:
    """Waiting jobs, taken round-robin across clients; bounded in all and per client."""

    def __init__(self, max_total: int, max_per_client: int) -> None:
        self.max_total, self.max_per_client = max_total, max_per_client
        self.entries: list[_Entry] = []
        self.last: dict[str, int] = {}  # client -> round of its last waiting job
        self.served = 0  # round of the job taken last: a newcomer joins the next one
        self.arrivals = 0

    def __len__(self) -> int:
        return len(self.entries)

    def push(self, client: str, job: Any) -> None:
        """Queue ``job`` for ``client``; ``Busy`` naming which bound it hit."""
        if len(self.entries) >= self.max_total:
            raise Busy(f"busy: {len(self.entries)} jobs are waiting; try again when one is done")
        mine = sum(e.client == client for e in self.entries)
        if mine >= self.max_per_client:
            raise Busy(
                f"busy: {mine} of your jobs are waiting, the most one client may queue; "
                "try again when one of them is done"
            )
        self.arrivals += 1
        rnd = max(self.served, self.last.get(client, 0)) + 1
        self.last[client] = rnd
        self.entries.append(_Entry(rnd, self.arrivals, client, job))

    def pop(self) -> Any | None:
        """The next job in fair order (None when none waits)."""
        if not self.entries:
            return None
        entry = min(self.entries)
        self.remove(entry.job)
        self.served = entry.round
        return entry.job

    def remove(self, job: Any) -> None:
        """Take ``job`` out (a cancel); a client with nothing left waiting is forgotten,
        so the table holds only clients that have jobs waiting."""
        entry = next(e for e in self.entries if e.job is job)
        self.entries.remove(entry)
        if not any(e.client == entry.client for e in self.entries):
            del self.last[entry.client]

    def position(self, job: Any) -> int | None:
        """``job``'s place in the order the worker will take them (1: next), or None."""
        order = sorted(self.entries)
        return next((k + 1 for k, e in enumerate(order) if e.job is job), None)
