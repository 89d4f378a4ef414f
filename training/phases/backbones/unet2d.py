"""The Stable Diffusion denoiser: ``diffusers.UNet2DConditionModel``, cross-attending to the
CLIP text states in every block but the deepest (SD's layout, at Kiln's widths)."""

from __future__ import annotations

from diffusers import UNet2DConditionModel

from training.config import Params


def build(
    params: Params, latent_channels: int, latent_size: int, text_dim: int
) -> UNet2DConditionModel:
    c = params.train_unet
    n = len(c.block_out_channels)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=c.block_out_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        layers_per_block=c.layers_per_block,
        cross_attention_dim=text_dim,
        attention_head_dim=c.attention_head_dim,
        norm_num_groups=c.norm_num_groups,
    )
