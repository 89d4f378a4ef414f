"""The denoiser backbones ``train_unet`` can train, by ``train_unet.backbone``.

A backbone is everything that differs between denoiser families: the diffusers model
and the standard pipeline that samples it, the training objective, which text states
the pipeline feeds it and how. The training step, precompute_latents, sampling,
evaluation and serving ask this table instead of naming a family. Adding one: a
module here with a ``BACKBONE``, its entry in ``get``'s table, its name in the
``train_unet.backbone`` literal of ``training/sections.py`` (and, for its registry
signature, a case in ``tracking/registry.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from training.backbones.base import Backbone, TextDims

__all__ = ["Backbone", "TextDims", "denoiser", "get", "of_class", "of_pipeline"]


def get(name: str) -> Backbone:
    from training.backbones import dit, unet2d

    table = {"unet2d": unet2d.BACKBONE, "dit": dit.BACKBONE}
    return table[name]


def of_class(model_class: str) -> Backbone:
    """The backbone whose denoiser is the diffusers class named ``model_class`` (a saved
    config's ``_class_name``)."""
    for name in ("unet2d", "dit"):
        if get(name).model_class.__name__ == model_class:
            return get(name)
    raise ValueError(f"{model_class} is not the denoiser of a Kiln backbone")


def of_pipeline(pipe: Any) -> Backbone:
    """The backbone of an assembled or loaded pipeline."""
    return get("dit" if hasattr(pipe, "transformer") else "unet2d")


def denoiser(pipe: Any) -> torch.nn.Module:
    """The pipeline's denoiser, whichever family (``pipe.unet`` or ``pipe.transformer``)."""
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
