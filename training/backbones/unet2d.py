"""The Stable Diffusion denoiser: ``diffusers.UNet2DConditionModel``, cross-attending to the
CLIP text states in every block but the deepest (SD's layout, at Kiln's widths; with
``plain_levels`` the highest resolutions go without, as SDXL's), trained on the DDPM
objective and sampled by ``StableDiffusionPipeline``."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from training.backbones.base import Backbone, TextDims
from training.config import Params


def build(
    params: Params, latent_channels: int, latent_size: int, text: TextDims
) -> UNet2DConditionModel:
    c = params.train_unet
    n = len(c.block_out_channels)
    # cross-attention in every level but the deepest and the first plain_levels
    attends = [c.plain_levels <= i < n - 1 for i in range(n)]
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=c.block_out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attends[::-1]),
        layers_per_block=c.layers_per_block,
        cross_attention_dim=text.hidden,
        attention_head_dim=c.attention_head_dim,
        norm_num_groups=c.norm_num_groups,
    )


def text_states(encoder: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """CLIP's last hidden states, as ``StableDiffusionPipeline.encode_prompt`` takes them."""
    return {"text": encoder(ids).last_hidden_state}


def predict(model, zt: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    return model(zt, t, encoder_hidden_states=cond["text"]).sample


def prompt_kwargs(cond: dict) -> dict[str, torch.Tensor]:
    return {"prompt_embeds": cond["text"]}


def assemble(vae, tokenizer, text_encoder, unet, scheduler) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _text_encoder(clip_dir):
    from training.inference.text import load_text_encoder

    return load_text_encoder(clip_dir)


BACKBONE = Backbone(
    name="unet2d",
    objective="ddpm",
    model_class=UNet2DConditionModel,
    pipeline_class=StableDiffusionPipeline,
    build=build,
    text_encoder=_text_encoder,
    text_states=text_states,
    predict=predict,
    assemble=assemble,
    downsampling=lambda cfg: 2 ** (len(cfg.block_out_channels) - 1),
    prompt_kwargs=prompt_kwargs,
)
