"""The denoiser backbones ``train_unet`` can train, by ``train_unet.backbone``.

Each is one module with ``build(params, latent_channels, latent_size, text_dim)``
returning a diffusers model that ``StableDiffusionPipeline`` can sample with. Adding a
backbone: one module here plus one entry in ``BACKBONES`` (and its name in the
``train_unet.backbone`` literal of ``training/config.py``).
"""

from __future__ import annotations

from collections.abc import Callable

from training.phases.backbones import unet2d

BACKBONES: dict[str, Callable] = {
    "unet2d": unet2d.build,
}
