"""Assembling and sampling the text-to-image model.

The product is a standard diffusers ``StableDiffusionPipeline`` directory (VAE, CLIP
text encoder + tokenizer, U-Net, scheduler; safetensors weights) that anyone can load
offline with ``from_pretrained``. Samplers are diffusers schedulers chosen by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image

SCHEDULERS = {
    "ddpm": lambda cfg: DDPMScheduler.from_config(cfg),
    "ddim": lambda cfg: DDIMScheduler.from_config(cfg),
    "dpm++": lambda cfg: DPMSolverMultistepScheduler.from_config(
        cfg, algorithm_type="dpmsolver++", solver_order=2
    ),
    "euler": lambda cfg: EulerDiscreteScheduler.from_config(cfg),
}


def assemble(
    vae_dir: Path, clip_dir: Path, unet_dir: Path, scheduler: str = "dpm++"
) -> StableDiffusionPipeline:
    from training.latents import load_text_encoder

    tokenizer, text_encoder = load_text_encoder(clip_dir)
    ddpm = DDPMScheduler.from_pretrained(unet_dir)
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae_dir),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=UNet2DConditionModel.from_pretrained(unet_dir),
        scheduler=SCHEDULERS[scheduler](ddpm.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load(path: str | Path) -> StableDiffusionPipeline:
    """A saved pipeline directory, on the GPU when there is one (``mechanics.device``)."""
    from diffusers.utils import logging as diffusers_logging

    from training.mechanics import device

    diffusers_logging.disable_progress_bar()  # no "Loading pipeline components" bar
    pipe = StableDiffusionPipeline.from_pretrained(
        str(path), safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device())


def set_scheduler(pipe: StableDiffusionPipeline, name: str) -> None:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r} (choose {', '.join(SCHEDULERS)})")
    pipe.scheduler = SCHEDULERS[name](pipe.scheduler.config)


@dataclass(frozen=True)
class Request:
    prompt: str
    seed: int
    steps: int = 20
    guidance: float = 4.0
    negative: str = ""


def slug(text: str, max_len: int = 48) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:max_len].rstrip("-") or "empty"


@torch.no_grad()
def generate(
    pipe: StableDiffusionPipeline, requests: list[Request], batch_size: int = 64
) -> list[Image.Image]:
    """Images for ``requests`` in order. Requests sharing (steps, guidance, negative) are
    batched; each image's initial noise comes from its own seed, so an image does not
    depend on what else was in its batch."""
    pipe.set_progress_bar_config(disable=True)
    out: list[Image.Image | None] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault((r.steps, r.guidance, r.negative), []).append(i)
    for (steps, guidance, negative), idx in groups.items():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            result = pipe(
                prompt=[requests[i].prompt for i in chunk],
                negative_prompt=[negative] * len(chunk) if negative or guidance > 1 else None,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=[torch.Generator().manual_seed(requests[i].seed) for i in chunk],
                output_type="pil",
            )
            for i, img in zip(chunk, result.images, strict=True):
                out[i] = img
    return out  # type: ignore[return-value]
