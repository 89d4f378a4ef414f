"""The DiT backbone (SD3's MMDiT) without a pipeline run: its config checks, the
collapsed T5 slot against the standard pipeline, and its flow-matching step.
The end-to-end run (train, evaluate, register, export) is in tests/test_e2e.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_serving import build_tiny_pipeline
from training import config
from training.backbones import TextDims, dit
from training.inference import sampling


def _dit(**unet) -> dict:
    return {"train_unet": {"backbone": "dit", **unet}}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_dit(dit_heads=5), "train_unet.dit_heads 5 does not divide train_unet.dit_width 96"),
        (_dit(dit_patch_size=3), "train_unet.dit_patch_size 3 does not divide the latent side 8"),
        (
            {**_dit(), "evaluate": {"scheduler": "ddim"}},
            "evaluate.scheduler ddim does not sample a rectified flow",
        ),
    ],
)
def test_a_dit_that_cannot_work_fails_at_config_load_naming_the_key(raw, message):
    with pytest.raises(config.ConfigError, match=message):
        config.resolve(raw)


def test_every_profile_has_a_dit():
    for profile in config.profiles():
        c = config.resolve({"profile": profile, **_dit()}).train_unet
        assert c.dit_width and c.dit_width % c.dit_heads == 0


def test_one_collapsed_zero_token_is_the_standard_256():
    """Kiln trains and samples with one T5-slot token counted 256 times; the standard
    processor with the pipeline's 256 zero tokens computes the same function, and a
    plain single zero token does not (so the collapse is what makes them agree)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    params = config.resolve(_dit(dit_width=64, dit_layers=3))
    torch.manual_seed(0)
    model = dit.build(params, 4, 8, TextDims(32, 16)).eval()
    for p in model.parameters():  # random, not diffusers' (partly zero) initialisation
        p.data.normal_(0, 0.2)
    cond = {"text": torch.randn(3, 10, 32), "pooled": torch.randn(3, 16)}
    zt, t = torch.randn(3, 4, 8, 8), torch.tensor([10.0, 500.0, 990.0])
    with torch.no_grad():
        ours = dit.predict(model, zt, t, cond)
        model.set_attn_processor(JointAttnProcessor2_0())
        pooled = dit.joint(cond)[1]

        def standard(t5_tokens: int) -> torch.Tensor:
            states = dit.joint(cond, t5_tokens)[0]
            return model(
                hidden_states=zt, timestep=t, encoder_hidden_states=states,
                pooled_projections=pooled,
            ).sample  # fmt: skip

        assert torch.allclose(ours, standard(256), atol=1e-4 * ours.abs().max())
        assert (ours - standard(1)).abs().max() > 0.1 * ours.abs().max()


def test_the_export_is_a_plain_sd3_pipeline_that_draws_kilns_images(tmp_path):
    """Kiln's sampling (collapsed T5 slot) and diffusers' own StableDiffusion3Pipeline
    with its defaults draw the same picture from the saved directory."""
    from diffusers import StableDiffusion3Pipeline

    path = build_tiny_pipeline(tmp_path, backbone="dit")
    pipe = sampling.load(path)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    request = sampling.Request("a red circle", seed=3, steps=4)
    ours = np.asarray(sampling.generate(pipe, [request])[0], dtype=float)

    # no T5 (what the diffusers docs pass to run SD3 without it)
    plain = StableDiffusion3Pipeline.from_pretrained(
        path, text_encoder_3=None, tokenizer_3=None, local_files_only=True
    )
    plain.set_progress_bar_config(disable=True)
    theirs = plain(
        "a red circle", num_inference_steps=4, guidance_scale=request.guidance,
        generator=torch.Generator().manual_seed(3), output_type="np",
    ).images[0] * 255  # fmt: skip
    assert ours.shape == (32, 32, 3)
    assert np.abs(ours - theirs).max() <= 2  # PIL rounding and float order
    assert sampling.Geometry.of(pipe) == sampling.Geometry(native=32, stride=4)
    with pytest.raises(ValueError, match="does not sample a rectified flow"):
        sampling.set_scheduler(pipe, "ddim")


def test_each_family_keeps_its_samplers_through_switches():
    """A pipeline's current sampler decides what it can switch to: a U-Net on DPM-Solver++
    (which also has flow options, off) stays in the DDPM family; a flow stays a flow."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    ddpm = DDPMScheduler(num_train_timesteps=1000)
    for first in ("dpm++", "euler", "ddim"):
        on = sampling.make_scheduler(first, ddpm.config)
        assert not sampling.is_flow(on.config)
        assert type(sampling.make_scheduler("ddim", on.config)).__name__ == "DDIMScheduler"
    flow = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=2.0)
    dpm = sampling.make_scheduler("dpm++", flow.config)
    assert dpm.config.use_flow_sigmas and dpm.config.flow_shift == 2.0
    back = sampling.make_scheduler("euler", dpm.config)
    assert isinstance(back, FlowMatchEulerDiscreteScheduler) and back.config.shift == 2.0
    assert sampling.scheduler_names(dpm.config) == ("euler", "dpm++")


def test_the_position_embedding_holds_the_widest_bucket():
    """Was: made 4x the trained side, so a bucket wider than that (320x16 at 64 px, with
    max_aspect_ratio 20) stopped train_unet after the VAE, CLIP and latents had trained
    ("Width (40) cannot be greater than pos_embed_max_size: 32"). The square and 4x
    sizes keep their embedding."""
    raw = {"profile": "tiny64", "ingest": {"resize_mode": "buckets", "bucket_stride": 8},
           "validate": {"max_aspect_ratio": 20}, **_dit()}  # fmt: skip
    params = config.resolve({**raw, "evaluate": {"scheduler": "euler"}})
    width, height = max(params.image_sizes())
    assert (width, height) == (320, 16)
    model = dit.build(params, 4, 16, TextDims(32, 16)).eval()
    cond = {"text": torch.randn(1, 5, 32), "pooled": torch.randn(1, 16)}
    with torch.no_grad():
        for w, h in ((width, height), (16, 64), (64, 64)):
            zt = torch.randn(1, 4, h // 4, w // 4)
            assert dit.predict(model, zt, torch.tensor([500.0]), cond).shape == zt.shape
    square = config.resolve({"profile": "tiny64", **_dit(), "evaluate": {"scheduler": "euler"}})
    assert dit.pos_embed_side(square, 16) == 4 * 16 // 2
