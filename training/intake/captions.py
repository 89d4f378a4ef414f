"""Caption lengths, measured before any tokenizer exists and after one is trained.

validate cannot count tokens (train_clip trains the tokenizer later), so it counts
words as CLIP's own pre-tokenizer cuts them: runs of letters, single digits, runs of
punctuation, and English contractions. BPE only merges within such a piece, so a caption
is at least ``words + 2`` tokens (start and end). train_clip then measures the real
token lengths with the tokenizer it trained and picks the context from them
(``phases/clip.py``). Both keep histograms, so memory stays flat in the data's size.

``plain_text`` undoes what web captions carry that nobody types in a prompt.
"""

from __future__ import annotations

import html
import unicodedata
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


# an HTML character reference with its ";" (html.unescape alone also reads legacy names
# without one: "a &notice" would become "a ¬ice")
_ENTITY = regex.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
# full-width ASCII (U+FF01-FF5E) and the Latin ligatures (U+FB00-FB06): compatibility
# forms a keyboard does not type; their NFKC is the ASCII letters
_COMPAT = regex.compile(r"[\uff01-\uff5e\ufb00-\ufb06]")


def _decoded(m: regex.Match) -> str:
    """A reference's character, or the reference as written where that is no text (a
    control character or NUL, which html.unescape drops or makes U+FFFD)."""
    out = html.unescape(m.group())
    text = out and all(c in "\t\n\r" or unicodedata.category(c)[0] != "C" for c in out)
    return out if text and "\ufffd" not in out else m.group()


def plain_text(caption: str) -> str:
    """``caption`` with HTML character references decoded (twice, for the "&amp;amp;"
    of text escaped twice, as CLIP's own cleaning does), full-width ASCII as ASCII and
    Latin ligatures as their letters (ftfy's width and ligature fixes, which OpenAI's
    CLIP applies and transformers' CLIPTokenizer does not).

    Why: web captions say "Tom &amp; Jerry", "ＲＥＤ", "ﬁsh"; a prompt says "Tom & Jerry",
    "red", "fish", and the tokenizer reads them as other bytes, so the model never saw
    the words a user types. validate applies it to every caption (``clean_caption``),
    so all of training reads the plain text; prompts are not changed, so a model
    trained before reads a prompt as it always did."""
    for _ in range(2):
        caption = _ENTITY.sub(_decoded, caption)
    return _COMPAT.sub(lambda m: unicodedata.normalize("NFKC", m.group()), caption)
