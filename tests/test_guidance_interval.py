"""Guidance in a limited interval (``SamplerDefaults.guidance_start``): the noisiest
fraction of the denoising steps sampled with the conditional prediction alone, the rest
with classifier-free guidance (``sampling.in_interval``).

On random-weight pipelines with the tiny profile's architectures (``build_tiny_pipeline``):
the U-Net's samples are checked against a denoising loop written out here from diffusers'
parts, so the test pins what the interval means, not only that the images change. The
choice of the interval per model is in test_guidance_choice.py and test_real_data.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_serving import build_tiny_pipeline
from training.inference import sampling

PROMPT = "a large red circle at the top"
STEPS, GUIDANCE, SEED = 6, 4.0, 3


@pytest.fixture(scope="module")
def unet_pipe(tmp_path_factory):
    return sampling.load(build_tiny_pipeline(tmp_path_factory.mktemp("interval")))


def _draw(pipe, guidance: float = GUIDANCE, start: float = 0.0) -> np.ndarray:
    r = sampling.Request(PROMPT, SEED, STEPS, guidance, guidance_start=start)
    return np.asarray(sampling.generate(pipe, [r])[0], dtype=np.int16)


@torch.no_grad()
def _written_out(pipe, first: int) -> np.ndarray:
    """The interval by hand: steps before ``first`` denoise with the conditional
    prediction alone, the rest with uncond + GUIDANCE * (cond - uncond)."""
    from diffusers.utils.torch_utils import randn_tensor

    own = sampling.private_pipeline(pipe)
    cond, uncond = own.encode_prompt([PROMPT], "cpu", 1, True, negative_prompt=[""])
    sched = own.scheduler
    sched.set_timesteps(STEPS)
    side = own.unet.config.sample_size
    shape = (1, own.unet.config.in_channels, side, side)
    gen = [torch.Generator().manual_seed(SEED)]
    latents = randn_tensor(shape, generator=gen, dtype=cond.dtype) * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        x = sched.scale_model_input(latents, t)
        if i < first:
            pred = own.unet(x, t, encoder_hidden_states=cond).sample
        else:
            both = own.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond]))
            u, c = both.sample.chunk(2)
            pred = u + GUIDANCE * (c - u)
        latents = sched.step(pred, t, latents).prev_sample
    image = own.vae.decode(latents / own.vae.config.scaling_factor).sample
    pil = own.image_processor.postprocess(image, output_type="pil")[0]
    return np.asarray(pil, dtype=np.int16)


def test_the_noisiest_steps_are_unguided_and_the_rest_guided(unet_pipe):
    start = 0.5  # int(0.5 * 6) = 3: steps 0-2 conditional alone, 3-5 guided
    assert sampling.guided_from(STEPS, start) == 3
    got = _draw(unet_pipe, start=start)
    # batch 2 against batch 1 in the unguided steps: oneDNN may round a pixel differently
    assert np.abs(got - _written_out(unet_pipe, 3)).max() <= 2
    # ...and the written-out loop tells the settings apart: guided throughout, or never
    for other in (_written_out(unet_pipe, 0), _written_out(unet_pipe, STEPS)):
        assert np.abs(got - other).max() > 8
    assert np.abs(_draw(unet_pipe) - _written_out(unet_pipe, 0)).max() <= 2


def test_a_start_below_one_step_is_plain_guidance_and_the_shared_pipeline_is_untouched(
    unet_pipe,
):
    plain = _draw(unet_pipe)
    assert sampling.guided_from(STEPS, 0.1) == 0  # diffusers' guiders round down
    assert np.array_equal(_draw(unet_pipe, start=0.1), plain)
    _draw(unet_pipe, start=0.5)
    assert type(unet_pipe).__name__ == "StableDiffusionPipeline"
    assert np.array_equal(_draw(unet_pipe), plain)  # the interval did not stick
    # guidance 1 has no unconditional branch to leave out: the start changes nothing
    assert np.array_equal(_draw(unet_pipe, 1.0, 0.5), _draw(unet_pipe, 1.0))


def test_requests_of_several_starts_are_batched_apart(unet_pipe):
    reqs = [sampling.Request(PROMPT, SEED, STEPS, GUIDANCE, guidance_start=s) for s in (0, 0.5)]
    together = [np.asarray(i, dtype=np.int16) for i in sampling.generate(unet_pipe, reqs)]
    assert np.abs(together[0] - _draw(unet_pipe)).max() <= 2
    assert np.abs(together[1] - _draw(unet_pipe, start=0.5)).max() <= 2


def test_a_controlnet_pipeline_takes_the_same_interval(unet_pipe):
    """A fresh ControlNet adds exactly zero (zero convolutions), so with the interval its
    pipeline must draw what the plain one draws: the doubled control image and the
    unguided steps line up (diffusers doubles the control once per call, for both halves)."""
    from PIL import Image

    from training.inference.control import with_controlnet
    from training.phases.controlnet import build

    steered = with_controlnet(unet_pipe, build(unet_pipe.unet, 3).eval())
    control = (Image.new("RGB", (32, 32)), 1.0)
    r = sampling.Request(PROMPT, SEED, STEPS, GUIDANCE, guidance_start=0.5)
    got = np.asarray(sampling.generate(steered, [r], control=control)[0], dtype=np.int16)
    assert np.array_equal(got, _draw(unet_pipe, start=0.5))


def test_the_dit_takes_the_interval_too(tmp_path):
    pipe = sampling.load(build_tiny_pipeline(tmp_path, backbone="dit"))
    plain, never = _draw(pipe), _draw(pipe, 1.0)
    half = _draw(pipe, start=0.5)
    assert np.abs(half - plain).max() > 8 and np.abs(half - never).max() > 8
    assert np.array_equal(_draw(pipe, start=0.5), half)  # deterministic


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), True, "0.4"])
def test_a_start_outside_0_1_is_refused_in_one_line(bad):
    with pytest.raises(ValueError, match=r"guidance_start must be a fraction in \[0, 1\)"):
        sampling.check_request(sampling.Request(PROMPT, 0, guidance_start=bad))


def test_the_run_summary_shows_the_served_guidance_interval_and_the_gate_distance(
    tmp_path, monkeypatch
):
    """The summary printed ``guidance 3.000`` for a model served at 3 from 40% of the
    steps, and left out fd_clip_ratio, the gate's metric for data without an oracle."""
    import json

    from flows import pipeline

    metrics = tmp_path / "data" / "metrics"
    metrics.mkdir(parents=True)
    ev = {"guidance": 3.0, "guidance_start": 0.4, "fd_clip_ratio": 1.62, "clip_score": 0.8}
    (metrics / "evaluate.json").write_text(json.dumps(ev))
    monkeypatch.setattr(pipeline, "ROOT", tmp_path)
    params = {"ingest": {"dataset": "folder"}, "profile": "tiny"}
    md, text = pipeline.summarize(params, {"kiln-text2image": "1"})
    shown = ("guidance_start     0.400", "fd_clip_ratio      1.620", "guidance           3.000")
    assert all(line in text for line in shown), text
    assert "| fd_clip_ratio | 1.620 |" in md
