"""Progress lines on stderr, one format for every stage (``[kiln] stage: ...``)."""

from __future__ import annotations

import sys


def say(msg: str) -> None:
    print(f"[kiln] {msg}", file=sys.stderr, flush=True)
