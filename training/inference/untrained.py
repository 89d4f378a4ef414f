"""Which tokens no training caption used, saved with the tokenizer, and what a user is
told when a prompt leans on them.

Why: the tokenizer is byte-level, so an emoji, a CJK character or a word the captions
never had is never lost nor the unknown token: it is spelt in tokens. But tokens that
no caption used were never trained: their embeddings are the random ones CLIP started
from. A prompt of such text alone ("🚗🚗" to a model of shapes) was drawn from noise in
place of a text, and nothing said so. The ids are kept in the tokenizer's own config
(``tokenizer_config.json``: a tokenizer saved by diffusers, MLflow or ``kiln export``
carries them), so the note is the same wherever the model is loaded. A tokenizer trained
before has no such list: nothing can be said of it, and ``untrained_note`` says nothing.
"""

from __future__ import annotations

from transformers import CLIPTokenizer

KEY = "kiln_untrained_ids"


def record(tokenizer: CLIPTokenizer, used: set[int]) -> None:
    """Keep in ``tokenizer`` (saved by its next ``save_pretrained``) the ids of its
    vocabulary not in ``used``, the ids the training captions were tokenized into."""
    tokenizer.init_kwargs[KEY] = sorted(set(range(len(tokenizer))) - used)


def untrained_note(tokenizer: CLIPTokenizer, text: str, what: str = "the prompt") -> str | None:
    """One line naming the parts of ``text`` whose tokens no training caption used, or
    None (all trained, or a tokenizer that does not record it). Consecutive such tokens
    are named together, so an emoji's bytes read as the emoji."""
    untrained = set(tokenizer.init_kwargs.get(KEY) or ())
    if not untrained:
        return None
    ids = tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids
    body = ids[1:-1]  # start and end of text: in every caption
    # named by whole words ('plain', not the 'pla' of it): a word's last token ends in </w>
    word, n = [], 0
    for token in tokenizer.convert_ids_to_tokens(body):
        word.append(n)
        n += token.endswith("</w>")
    bad = sorted({word[j] for j, i in enumerate(body) if i in untrained})
    runs: list[list[int]] = []  # the ids of consecutive words with an untrained token
    for k, w in enumerate(bad):
        if not k or w != bad[k - 1] + 1:
            runs.append([])
        runs[-1] += [i for j, i in enumerate(body) if word[j] == w]
    if not runs:
        return None
    parts = ", ".join(repr(tokenizer.decode(r)) for r in runs[:5])
    more = f" and {len(runs) - 5} more" if len(runs) > 5 else ""
    if all(i in untrained for i in body):
        return (
            f"nothing in {what} was in the training captions ({parts}{more}): "
            "the text encoder never learnt its tokens, so the picture follows no text"
        )
    return (
        f"{what} has text the training captions never had: {parts}{more}; "
        "the text encoder never learnt those tokens and reads them as noise"
    )
