"""SD3's diffusion transformer: ``diffusers.SD3Transformer2DModel`` (MMDiT, Esser et al.
2024), trained as a rectified flow and sampled by ``StableDiffusion3Pipeline``.

Text comes as ``StableDiffusion3Pipeline.encode_prompt`` makes it, with Kiln's one CLIP
(as ``CLIPTextModelWithProjection``) in both of SD3's CLIP slots and no T5, the way the
diffusers docs run SD3 without T5: per-token states are CLIP's penultimate hidden states
of slot 1 and slot 2 side by side (so ``joint_attention_dim`` is twice CLIP's width),
followed by ``T5_TOKENS`` zero tokens where T5's would be; the pooled vector is both
slots' projected embeddings side by side. The exported pipeline is therefore the
standard one, and ``from_pretrained`` plus a plain call gives Kiln's images.

The 256 zero tokens would be most of every sequence at Kiln's sizes (4.6x the step time
at tiny: benchmarks/dit_t5_slot.py). They are all equal, and stay equal through every
block (each block treats tokens alike), so in attention they act as one token counted
256 times: Kiln trains and samples with one zero token whose attention logit carries
+ log 256 (``CollapsedZerosProcessor``), which is the same function. ``tests/test_dit.py``
checks that the standard pipeline (256 zeros, diffusers' processor) draws the same
images.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from training.backbones.base import Backbone, TextDims
from training.config import Params

# StableDiffusion3Pipeline's default max_sequence_length: the T5 slot's length
T5_TOKENS = 256
# A side may be up to this many times the trained side (inference/sampling.py's
# MAX_SIZE_FACTOR); the position embedding is made that large and cropped to the input.
MAX_SIZE_FACTOR = 4


def pos_embed_side(params: Params, latent_size: int) -> int:
    """Patches a side of the position embedding: ``MAX_SIZE_FACTOR`` times the trained
    side, or the longest side of an aspect-ratio bucket when that is longer (was: 4x
    only, so a wide bucket, e.g. 320x16 at 64 px with ``validate.max_aspect_ratio`` 20,
    stopped train_unet after the VAE, CLIP and latents with diffusers' "Width (40)
    cannot be greater than pos_embed_max_size: 32")."""
    longest = max(max(size) for size in params.image_sizes())
    side = max(MAX_SIZE_FACTOR * latent_size, longest * latent_size // params.ingest.image_size)
    return side // params.train_unet.dit_patch_size


def build(params: Params, latent_channels: int, latent_size: int, text: TextDims):
    c = params.train_unet
    assert c.dit_width and c.dit_heads and c.dit_layers  # UnetCfg checked them
    model = SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=c.dit_patch_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=c.dit_layers,
        attention_head_dim=c.dit_width // c.dit_heads,
        num_attention_heads=c.dit_heads,
        joint_attention_dim=2 * text.hidden,
        caption_projection_dim=c.dit_width,
        pooled_projection_dim=2 * text.pooled,
        pos_embed_max_size=pos_embed_side(params, latent_size),
        qk_norm="rms_norm",  # SD3.5's: keeps attention logits in range at higher rates
    )
    collapse_zeros(model)
    return model


class CollapsedZerosProcessor:
    """SD3's joint attention for a context whose last token stands for ``copies`` equal
    tokens: its attention logit gets + log(copies), which is what ``copies`` equal keys
    with equal values contribute to every softmax. Otherwise as diffusers'
    ``JointAttnProcessor2_0`` (image and context projections, optional q/k norms, one
    attention over both, split again)."""

    def __init__(self, copies: int = T5_TOKENS):
        self.copies = copies

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):  # fmt: skip
        b, n = hidden_states.shape[:2]

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q = split_heads(attn.to_q(hidden_states))
        k = split_heads(attn.to_k(hidden_states))
        v = split_heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        bias = None
        if encoder_hidden_states is not None:
            cq = split_heads(attn.add_q_proj(encoder_hidden_states))
            ck = split_heads(attn.add_k_proj(encoder_hidden_states))
            cv = split_heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
            bias = torch.zeros(1, 1, 1, k.shape[2], dtype=q.dtype, device=q.device)
            bias[..., -1] = math.log(self.copies)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3]).to(q.dtype)
        image = attn.to_out[1](attn.to_out[0](out[:, :n]))
        if encoder_hidden_states is None:
            return image
        context = out[:, n:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return image, context


def collapse_zeros(model: SD3Transformer2DModel) -> None:
    """Let ``model`` take the T5 slot as one zero token (see the module docstring). Not
    saved with the weights: a loaded model has diffusers' processor until this runs."""
    model.set_attn_processor(CollapsedZerosProcessor())


def joint(cond: dict[str, torch.Tensor], t5_tokens: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(encoder_hidden_states, pooled_projections)`` from the stored CLIP states, as
    ``encode_prompt`` builds them: both CLIP slots side by side, then the T5 slot's zero
    tokens (one, collapsed, unless ``t5_tokens`` says otherwise)."""
    text, pooled = cond["text"], cond["pooled"]
    clip = torch.cat([text, text], dim=-1)
    zeros = clip.new_zeros(clip.shape[0], t5_tokens, clip.shape[-1])
    return torch.cat([clip, zeros], dim=1), torch.cat([pooled, pooled], dim=-1)


def text_encoder(clip_dir: Path):
    """The tokenizer and the trained CLIP's text tower with its projection, as
    ``StableDiffusion3Pipeline`` loads each of its CLIP slots."""
    from transformers import CLIPModel, CLIPTextModelWithProjection, CLIPTokenizer

    clip = CLIPModel.from_pretrained(clip_dir)
    config = clip.config.text_config
    config.projection_dim = clip.config.projection_dim
    encoder = CLIPTextModelWithProjection(config)
    encoder.text_model = clip.text_model
    encoder.text_projection = clip.text_projection
    return CLIPTokenizer.from_pretrained(clip_dir), encoder.eval()


def text_states(encoder, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Penultimate hidden states and the projected pooled embedding, as
    ``StableDiffusion3Pipeline._get_clip_prompt_embeds`` takes them (clip_skip None)."""
    out = encoder(ids, output_hidden_states=True)
    return {"text": out.hidden_states[-2], "pooled": out.text_embeds}


def predict(model, zt: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    states, pooled = joint(cond)
    return model(
        hidden_states=zt, timestep=t, encoder_hidden_states=states, pooled_projections=pooled
    ).sample


def prompt_kwargs(cond: dict) -> dict[str, torch.Tensor]:
    states, pooled = joint(cond)
    return {"prompt_embeds": states, "pooled_prompt_embeds": pooled}


def prepare(pipe: StableDiffusion3Pipeline) -> None:
    collapse_zeros(pipe.transformer)


def call_kwargs(pipe: StableDiffusion3Pipeline) -> dict:
    """One T5-slot token where the collapsed processor counts it 256 times; none
    otherwise (the pipeline's 256 zeros, diffusers' processor)."""
    procs = pipe.transformer.attn_processors.values()
    if all(isinstance(p, CollapsedZerosProcessor) for p in procs):
        return {"max_sequence_length": 1}
    return {}


def assemble(vae, tokenizer, text_encoder, transformer, scheduler) -> StableDiffusion3Pipeline:
    """One CLIP in both CLIP slots, no T5. SD3 decodes ``z / scaling + shift``: Kiln's
    latents are not shifted, so the VAE says 0 where it says nothing."""
    if vae.config.shift_factor is None:
        vae.register_to_config(shift_factor=0.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


BACKBONE = Backbone(
    name="dit",
    objective="flow",
    model_class=SD3Transformer2DModel,
    pipeline_class=StableDiffusion3Pipeline,
    build=build,
    text_encoder=text_encoder,
    text_states=text_states,
    predict=predict,
    assemble=assemble,
    downsampling=lambda cfg: cfg.patch_size,
    prompt_kwargs=prompt_kwargs,
    prepare=prepare,
    call_kwargs=call_kwargs,
)
