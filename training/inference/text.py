"""Text conditioning and CLIP embeddings, written once for training and inference.

Text conditioning is made exactly as ``StableDiffusionPipeline`` makes it: token ids
padded to the tokenizer's max length (no attention mask), then the CLIP text encoder's
last hidden states. The CLIP phase, the latent precompute, sampling and evaluation all
encode here, so training and inference cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer


def encode_text(tokenizer: CLIPTokenizer, captions: list[str], tensors: str = "pt") -> torch.Tensor:
    """Token ids exactly as ``StableDiffusionPipeline`` makes them: padded to max length
    (``tensors="np"``: as a numpy array, for the loaders' torch-free collate)."""
    return tokenizer(
        captions,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors=tensors,
    ).input_ids


def cut_note(tokenizer: CLIPTokenizer, text: str, what: str = "the prompt") -> str | None:
    """What a user is told when the text encoder reads only the start of ``text`` (its
    ``model_max_length`` tokens, end of text included): the length and the words kept.
    None when it fits. One wording for ``kiln generate``, the playground and REST."""
    limit = tokenizer.model_max_length
    n = len(tokenizer(text, truncation=False).input_ids)
    if n <= limit:
        return None
    kept = tokenizer.decode(
        tokenizer(text, truncation=True, max_length=limit).input_ids, skip_special_tokens=True
    )
    return f"{what} is {n} tokens; the text encoder reads {limit}, so only {kept!r} is used"


def prompt_notes(tokenizer: CLIPTokenizer, text: str, what: str = "the prompt") -> list[str]:
    """What a user is told of one prompt: cut to the context (``cut_note``), text no
    training caption had (``untrained.untrained_note``); those that apply."""
    from training.inference.untrained import untrained_note

    notes = (cut_note(tokenizer, text, what), untrained_note(tokenizer, text, what))
    return [n for n in notes if n]


def cut_notes(tokenizer: CLIPTokenizer, prompt: str, negative: str = "") -> list[str]:
    """``prompt_notes`` of a request's prompt and of its negative prompt (the REST
    model's and the playground's notes)."""
    notes = prompt_notes(tokenizer, prompt)
    if negative:
        notes += prompt_notes(tokenizer, negative, "the negative prompt")
    return notes


def load_text_encoder(clip_dir: Path) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """The text half of the trained CLIPModel, as the pipeline will load it."""
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    text = CLIPModel.from_pretrained(clip_dir).text_model.eval()
    return tokenizer, text


@torch.no_grad()
def text_states(
    tokenizer: CLIPTokenizer, encoder: CLIPTextModel, captions: list[str]
) -> torch.Tensor:
    ids = encode_text(tokenizer, captions).to(encoder.device)
    return encoder(ids).last_hidden_state.float().cpu()


@torch.no_grad()
def embed(
    model: CLIPModel,
    pixels: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
    batch: int = 256,
) -> torch.Tensor:
    """Normalised projected embeddings, on the CPU, computed on the model's device
    (transformers 5: features come as ModelOutput)."""
    outs = []
    if pixels is not None:
        for b in pixels.split(batch):
            outs.append(model.get_image_features(pixel_values=b.to(model.device)).pooler_output)
    else:
        for b in ids.split(batch):
            outs.append(model.get_text_features(input_ids=b.to(model.device)).pooler_output)
    return F.normalize(torch.cat(outs).float().cpu(), dim=-1)
