"""CLIP score: cosine of prompt and image embeddings from Kiln's own CLIP (no downloaded
weights), averaged over the samples."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from training import engine as E
from training.evaluation.metrics.base import Samples


@functools.lru_cache(maxsize=2)
def load_clip(clip_dir: Path):
    """Kiln's CLIP and tokenizer, loaded once per evaluation (many scores use them)."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(clip_dir).eval().to(E.device())
    return model, CLIPTokenizer.from_pretrained(clip_dir)


@torch.no_grad()
def clip_scores(clip_dir: Path, prompts: list[str], images: list) -> np.ndarray:
    from training.engine.images import to_tensor
    from training.inference.text import embed, encode_text

    model, tok = load_clip(Path(clip_dir))
    px = to_tensor(np.stack([np.asarray(i.convert("RGB")) for i in images]))
    img_e = embed(model, pixels=px)
    txt_e = embed(model, ids=encode_text(tok, prompts))
    return (img_e * txt_e).sum(-1).numpy()


def score(s: Samples) -> dict[str, float]:
    return {"clip_score": float(np.mean(clip_scores(s.clip_dir, s.prompts, s.images)))}
