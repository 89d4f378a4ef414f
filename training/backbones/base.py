"""What a backbone is (``training/backbones/__init__.py`` has the table)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch


@dataclass(frozen=True)
class TextDims:
    """What the text encoder gives a denoiser: per-token states and a pooled vector."""

    hidden: int  # width of the per-token states
    pooled: int  # width of the projected, pooled text embedding


@dataclass(frozen=True)
class Backbone:
    name: str
    # "ddpm": noise (or v) prediction on a DDPM schedule; "flow": rectified flow, the
    # velocity noise - x0 at t in [0, 1] (training/phases/unet.py, make_step_fn)
    objective: Literal["ddpm", "flow"]
    model_class: type  # loads the saved denoiser: model_class.from_pretrained(dir)
    pipeline_class: type  # the standard diffusers pipeline that samples it
    # (params, latent channels, latent side, text dims) -> the untrained denoiser
    build: Callable[..., torch.nn.Module]
    # the text encoder as the pipeline loads it: (CLIP folder) -> (tokenizer, encoder)
    text_encoder: Callable[..., tuple[Any, torch.nn.Module]]
    # (encoder, token ids) -> the per-sample text tensors precompute_latents stores
    # ({"text": ...} and maybe "pooled"), made exactly as the pipeline makes them
    text_states: Callable[..., dict[str, torch.Tensor]]
    # (model, noisy latents, timesteps, stored text tensors) -> the model's prediction
    predict: Callable[..., torch.Tensor]
    # (vae, tokenizer, text encoder, denoiser, scheduler) -> the pipeline
    assemble: Callable[..., Any]
    # (denoiser config) -> latent pixels per step of its coarsest grid
    downsampling: Callable[[Any], int]
    # (stored text tensors) -> the pipeline's prompt-embedding arguments for them (the
    # negative ones: the same names with "negative_" in front)
    prompt_kwargs: Callable[[dict], dict[str, torch.Tensor]]
    # (pipeline) -> None: ready a loaded or assembled pipeline for Kiln's calls
    prepare: Callable[[Any], None] = lambda pipe: None
    # (pipeline) -> extra arguments of every Kiln call to it
    call_kwargs: Callable[[Any], dict] = lambda pipe: {}
