"""Caption lengths, measured before any tokenizer exists and after one is trained.

validate cannot count tokens (train_clip trains the tokenizer later), so it counts
words as CLIP's own pre-tokenizer cuts them: runs of letters, single digits, runs of
punctuation, and English contractions. BPE only merges within such a piece, so a caption
is at least ``words + 2`` tokens (start and end). train_clip then measures the real
token lengths with the tokenizer it trained and picks the context from them
(``phases/clip.py``). Both keep histograms, so memory stays flat in the data's size.
"""

from __future__ import annotations

from collections import Counter

import regex

# CLIPTokenizer's pre-tokenizer pattern (transformers' tokenization_clip.py), specials aside
_PIECES = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.I)


def words(caption: str) -> int:
    """CLIP pre-tokenizer pieces in ``caption``: a lower bound on its tokens, less 2."""
    return len(_PIECES.findall(caption.lower()))


def percentile(hist: Counter, q: float) -> int:
    """The smallest length holding at least a fraction ``q`` of the counted items."""
    total, seen = sum(hist.values()), 0
    for length in sorted(hist):
        seen += hist[length]
        if seen >= q * total:
            return length
    return max(hist, default=0)


def summary(hist: Counter) -> dict[str, int]:
    """p50/p90/p95/p99/max of a length histogram (zeros when it is empty)."""
    out = {f"p{q}": percentile(hist, q / 100) for q in (50, 90, 95, 99)}
    out["max"] = max(hist, default=0)
    return out
