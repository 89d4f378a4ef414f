"""The BPE trainer's text and merges for scripts written without spaces (Chinese,
Japanese, Thai, ...): one token per character, never one per caption.

Why: CLIP's pre-tokeniser cuts words at spaces and between letters and other
characters, so a caption in such a script is one "word" from end to end, and BPE,
trained on the user's captions, merged every caption seen twice into a single token
(60 distinct Chinese captions: 60 tokens, each caption one id). The text encoder then
learnt one embedding per caption, with nothing shared between "红色的狗" and "红色的猫",
and a prompt that was no caption fell apart into bytes. The pre-tokeniser cannot change
(``CLIPTokenizer.from_pretrained`` rebuilds it from its class, ignoring the saved one,
and diffusers loads the tokenizer that way), so the trainer reads each such character
as a word of its own (as BERT's tokenizer splits CJK characters), and each of its
word-final merges is kept without ``</w>`` too, for the characters inside a run. Words
of spaced scripts merge as before. Only tokenizers trained from now on change: one
trained before keeps its merges and reads every prompt as it did.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

import regex

# Scripts written without spaces between words (Unicode script property)
SPACELESS = regex.compile(
    r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}\p{Tibetan}]"
)
EOW = "</w>"


@functools.cache
def _byte_of() -> dict[str, int]:
    """The byte-level alphabet's symbol for each byte, reversed (GPT-2's map, which the
    ``ByteLevel`` pre-tokeniser and decoder use)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return {chr(b if b in keep else next(extra)): b for b in range(256)}


def isolate(captions: Iterable[str]) -> Iterator[str]:
    """The captions as the BPE trainer reads them: each character of a space-less script
    set apart by spaces, so that no merge crosses one (the prompt is not changed: this is
    training text only)."""
    for text in captions:
        yield SPACELESS.sub(r" \g<0> ", text)


def _inside_one_char(token: str) -> bool:
    data = bytes(_byte_of()[s] for s in token.removesuffix(EOW))
    return all(b & 0xC0 == 0x80 for b in data[1:])  # no character starts after the first


def with_inner(merges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The merges, each one inside a character and word-final (trained on isolated
    characters, so all of theirs are) followed by the same merge without ``</w>``: a
    character inside a run of them, where only the run's last byte is word-final, is
    one token too. A merge already there is not repeated."""
    seen: set[tuple[str, str]] = set()
    out = []
    for a, b in merges:
        pairs = [(a, b)]
        if b.endswith(EOW) and _inside_one_char(a + b):
            pairs.append((a, b.removesuffix(EOW)))
        for pair in pairs:
            if pair not in seen:
                seen.add(pair)
                out.append(pair)
    return out
