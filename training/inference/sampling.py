"""Assembling and sampling the text-to-image model.

The product is a standard diffusers pipeline directory that anyone can load offline
with ``from_pretrained``: ``StableDiffusionPipeline`` (VAE, CLIP text encoder +
tokenizer, U-Net, scheduler) or, for the DiT backbone, ``StableDiffusion3Pipeline``
(the same CLIP in both CLIP slots, no T5); safetensors weights. Samplers are diffusers
schedulers chosen by name, in the DDPM family or the flow-matching one as the
denoiser was trained.

``generate`` may be called from many threads on one shared pipeline (``mlflow models
serve`` runs each request in its own thread): it never changes the shared pipeline. A
diffusers pipeline keeps per-call state on itself (the scheduler's timesteps and
``step_index``, ``_guidance_scale``, ``_num_timesteps``...), so each call builds its own
pipeline object and scheduler around the shared, read-only modules. User input is checked
with ``check_request`` (the CLI and the pyfunc both call it) before anything is computed.
"""

from __future__ import annotations

import copy
import math
import numbers
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
)
from PIL import Image

from training import backbones
from training.config import SAMPLER

# samplers of a denoiser trained on a DDPM schedule, made from its config
SCHEDULERS = {
    "ddpm": lambda cfg: DDPMScheduler.from_config(cfg),
    "ddim": lambda cfg: DDIMScheduler.from_config(cfg),
    "dpm++": lambda cfg: DPMSolverMultistepScheduler.from_config(
        cfg, algorithm_type="dpmsolver++", solver_order=2
    ),
    "euler": lambda cfg: EulerDiscreteScheduler.from_config(cfg),
}
# samplers of a rectified flow (the DiT), from its training steps and timestep shift
FLOW_SCHEDULERS = {
    "euler": lambda steps, shift: FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=steps, shift=shift
    ),
    "dpm++": lambda steps, shift: DPMSolverMultistepScheduler(
        num_train_timesteps=steps,
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
    ),  # fmt: skip
}


def is_flow(config) -> bool:
    """Whether a scheduler config samples a rectified flow."""
    # DPM-Solver++ set up for flow sigmas, or a scheduler without a beta schedule
    # (FlowMatchEulerDiscreteScheduler; every DDPM-family one has beta_start, and a
    # config made in memory has no _class_name to ask)
    return bool(config.get("use_flow_sigmas")) or "beta_start" not in config


def scheduler_names(config) -> tuple[str, ...]:
    """The samplers a denoiser with this scheduler config can use."""
    return tuple(FLOW_SCHEDULERS if is_flow(config) else SCHEDULERS)


def trained_scheduler(unet_dir: Path):
    """The training schedule saved beside a denoiser's weights (either family)."""
    import json

    config = json.loads((Path(unet_dir) / "scheduler_config.json").read_text())
    cls = FlowMatchEulerDiscreteScheduler if is_flow(config) else DDPMScheduler
    return cls.from_pretrained(unet_dir)


def make_scheduler(name: str, config):
    """The sampler ``name`` for a denoiser whose training (or current) scheduler has
    ``config``; ``ValueError`` naming the choices when that family has no such sampler."""
    if is_flow(config):
        if name not in FLOW_SCHEDULERS:
            raise ValueError(
                f"scheduler {name!r} does not sample a rectified flow (the dit backbone): "
                f"choose {', '.join(FLOW_SCHEDULERS)}"
            )
        shift = config.get("shift", config.get("flow_shift", 1.0))
        return FLOW_SCHEDULERS[name](config["num_train_timesteps"], shift)
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r} (choose {', '.join(SCHEDULERS)})")
    return SCHEDULERS[name](config)


def assemble(
    vae_dir: Path, clip_dir: Path, unet_dir: Path, scheduler: str = SAMPLER.scheduler
) -> DiffusionPipeline:
    """The pipeline of the denoiser in ``unet_dir`` (either backbone: its config says
    which), its VAE and CLIP."""
    import json

    name = json.loads((Path(unet_dir) / "config.json").read_text())["_class_name"]
    bb = backbones.of_class(name)
    tokenizer, text_encoder = bb.text_encoder(clip_dir)
    trained = json.loads((Path(unet_dir) / "scheduler_config.json").read_text())
    pipe = bb.assemble(
        AutoencoderKL.from_pretrained(vae_dir),
        tokenizer,
        text_encoder,
        bb.model_class.from_pretrained(unet_dir),
        make_scheduler(scheduler, trained),
    )
    bb.prepare(pipe)
    return pipe


def load(path: str | Path) -> DiffusionPipeline:
    """A saved pipeline directory, on the GPU when there is one (``engine.distributed.device``)."""
    import json

    from diffusers.utils import logging as diffusers_logging

    from training.engine.distributed import device

    diffusers_logging.disable_progress_bar()  # no "Loading pipeline components" bar
    index = json.loads((Path(path) / "model_index.json").read_text())
    extra = {  # the components Kiln's pipelines go without
        "StableDiffusionPipeline": {"safety_checker": None, "requires_safety_checker": False},
        "StableDiffusionControlNetPipeline": {
            "safety_checker": None,
            "requires_safety_checker": False,
        },
        # no T5: diffusers' documented way to run SD3 on its CLIPs alone
        "StableDiffusion3Pipeline": {"text_encoder_3": None, "tokenizer_3": None},
    }.get(index["_class_name"], {})
    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    backbones.of_pipeline(pipe).prepare(pipe)
    return pipe.to(device())


def set_scheduler(pipe: DiffusionPipeline, name: str) -> None:
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)


@dataclass(frozen=True)
class Request:
    prompt: str
    seed: int
    steps: int = SAMPLER.steps
    guidance: float = SAMPLER.guidance
    negative: str = SAMPLER.negative_prompt
    width: int | None = None  # pixels; None: the size the model was trained at
    height: int | None = None


# diffusers' schedulers refuse more inference steps than training timesteps (1000 here).
MAX_STEPS = 1000
# torch.Generator.manual_seed takes any 64-bit value but folds negative seeds onto
# positive ones (-1 is 2**64 - 2), so two seeds would name one image; int64 is also
# what the pyfunc signature declares.
MAX_SEED = 2**63 - 1
# A side may be at most this many times the trained side: a U-Net's attention and
# convolutions only ever saw the trained size, and the cost grows with the area.
MAX_SIZE_FACTOR = 4
# CLIP reads at most model_max_length tokens (set by train_clip) and drops the rest, so
# a longer prompt only costs tokenizer time; the bound keeps that time small.
MAX_PROMPT_CHARS = 4096


def _whole(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_request(r: Request) -> None:
    """Raise ``ValueError`` with a one-line message naming the field and the allowed
    range if ``r`` is not something ``generate`` should compute.

    prompt: a non-empty string of at most MAX_PROMPT_CHARS characters; negative: a string
    (may be empty) of at most MAX_PROMPT_CHARS; seed: a whole number in [0, MAX_SEED];
    steps: a whole number in [1, MAX_STEPS]; guidance: a finite number >= 0; width and
    height: None or a whole number >= 1 (which sizes a model draws is
    ``Geometry.size``'s check, once the model is loaded). Guidance
    below 1 is legal (diffusers then skips classifier-free guidance: 1 is the plain
    conditional model, 0 the unconditional one); a negative scale or NaN only makes noise.
    Called by the REST/pyfunc model and ``kiln generate`` before loading or computing."""
    for field, text in (("prompt", r.prompt), ("negative_prompt", r.negative)):
        if not isinstance(text, str):
            raise ValueError(f"{field} must be a string, got {type(text).__name__}")
        if len(text) > MAX_PROMPT_CHARS:
            raise ValueError(
                f"{field} is {len(text)} characters long; at most {MAX_PROMPT_CHARS} are allowed"
            )
    if not r.prompt.strip():
        raise ValueError("prompt must be a non-empty string")
    if not _whole(r.seed) or not 0 <= r.seed <= MAX_SEED:
        raise ValueError(f"seed must be a whole number in [0, {MAX_SEED}], got {r.seed!r}")
    if not _whole(r.steps) or not 1 <= r.steps <= MAX_STEPS:
        raise ValueError(f"steps must be a whole number in [1, {MAX_STEPS}], got {r.steps!r}")
    g = r.guidance
    if isinstance(g, bool) or not isinstance(g, numbers.Real) or not math.isfinite(g) or g < 0:
        raise ValueError(f"guidance must be a finite number >= 0, got {g!r}")
    for field, side in (("width", r.width), ("height", r.height)):
        if side is not None and (not _whole(side) or side < 1):
            raise ValueError(f"{field} must be a whole number of pixels >= 1, got {side!r}")


@dataclass(frozen=True)
class Geometry:
    """What sizes a pipeline can draw: ``native`` is the trained side in pixels; width and
    height must be multiples of ``stride`` (the VAE's downsampling times the U-Net's,
    so every U-Net level gets a whole number of latent pixels) up to ``MAX_SIZE_FACTOR``
    times ``native``."""

    native: int
    stride: int

    @classmethod
    def of(cls, pipe: DiffusionPipeline) -> Geometry:
        vae = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        net = backbones.denoiser(pipe).config
        down = backbones.of_pipeline(pipe).downsampling(net)
        return cls(native=int(net.sample_size) * vae, stride=vae * down)

    @property
    def sizes(self) -> range:
        return range(self.stride, MAX_SIZE_FACTOR * self.native + 1, self.stride)

    def size(self, r: Request) -> tuple[int, int]:
        """``(width, height)`` of a checked request; ``ValueError`` naming the sizes
        allowed when the model cannot draw it."""
        out = []
        for field, side in (("width", r.width), ("height", r.height)):
            side = self.native if side is None else int(side)
            if side not in self.sizes:
                raise ValueError(
                    f"{field} {side} is not a size this model draws: a multiple of "
                    f"{self.stride} from {self.stride} to {self.sizes[-1]} px "
                    f"(trained at {self.native})"
                )
            out.append(side)
        return out[0], out[1]

    def cost(self, r: Request) -> float:
        """The request's area in trained-size images (1.0 at the native size)."""
        w, h = self.size(r)
        return w * h / self.native**2


def manifest_line(
    file: str, r: Request, image: Image.Image, scheduler: str, model: str, version: str
) -> dict:
    """A picture's ``manifest.jsonl`` line (kiln generate, the playground's gallery)."""
    return {
        "file": file,
        "prompt": r.prompt,
        "seed": r.seed,
        "steps": r.steps,
        "guidance": r.guidance,
        "negative_prompt": r.negative,
        "width": image.width,
        "height": image.height,
        "scheduler": scheduler,
        "model": model,
        "model_version": version,
    }


def slug(text: str, max_len: int = 48) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:max_len].rstrip("-") or "empty"


def private_pipeline(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """A pipeline object of one's own around ``pipe``'s modules (shared, not copied) with
    a fresh scheduler of the same class and config.

    ``pipe(...)`` writes per-call state on the pipeline and on its scheduler (timesteps,
    ``step_index``, the multistep solvers' history, ``_guidance_scale``...). Two threads
    calling one pipeline interleave that state: DPM-Solver++ raised ``IndexError`` on
    ``step_index``, or, worse, returned another request's step schedule. The tokenizer
    is copied too: a fast tokenizer keeps its padding/truncation settings on the shared
    Rust object, and ``encode_prompt`` switches them per call (``max_length`` for the
    prompt, ``longest`` for the truncation check), so two threads could get each
    other's padding (seen in CI: negative and positive embeddings of lengths 2 and 9).
    The modules themselves are only read under ``no_grad``, so sharing them is safe and
    costs no memory."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    parts = {**pipe.components, "scheduler": scheduler}
    for name in ("tokenizer", "tokenizer_2"):
        if parts.get(name) is not None:
            parts[name] = copy.deepcopy(parts[name])
    sd = (StableDiffusionPipeline, StableDiffusionControlNetPipeline)
    extra = {"requires_safety_checker": False} if isinstance(pipe, sd) else {}
    own = type(pipe)(**parts, **extra)
    own.set_progress_bar_config(disable=True)
    return own


def _control_kwargs(control: tuple[Image.Image, float] | None, n: int) -> dict:
    if control is None:
        return {}
    image, scale = control
    return {"image": [image] * n, "controlnet_conditioning_scale": scale}


def _step_callback(deadline: float | None, progress: Callable[[int], None] | None) -> Callable:
    def check(pipe, step: int, timestep, kwargs: dict) -> dict:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"generation stopped at step {step}: past its deadline")
        if progress is not None:
            progress(1)
        return kwargs

    return check


def _batches(
    pipe: DiffusionPipeline, requests: list[Request], batch_size: int
) -> list[tuple[tuple, list[int]]]:
    """Each batch ``generate`` runs: (steps, guidance, negative, width, height), indices."""
    geometry = Geometry.of(pipe)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        key = (r.steps, r.guidance, r.negative, *geometry.size(r))
        groups.setdefault(key, []).append(i)
    return [
        (key, idx[start : start + batch_size])
        for key, idx in groups.items()
        for start in range(0, len(idx), batch_size)
    ]


def total_steps(pipe: DiffusionPipeline, requests: list[Request], batch_size: int = 64) -> int:
    """How many times ``generate`` calls ``progress``: each batch's denoising steps."""
    return sum(key[0] for key, _ in _batches(pipe, requests, batch_size))


@torch.no_grad()
def generate(
    pipe: DiffusionPipeline,
    requests: list[Request],
    batch_size: int = 64,
    deadline: float | None = None,
    control: tuple[Image.Image, float] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Image.Image]:
    """Images for ``requests`` in order, from the sampler ``pipe.scheduler`` names.

    Requests sharing (steps, guidance, negative, size) are batched, up to ``batch_size``; each
    image's initial noise comes from its own seed. Batching is not bit-exact on CPU:
    oneDNN chooses convolution algorithms by batch size, so a batched image can differ
    from the same request alone by 1/255 in a few pixels. ``batch_size=1`` makes every
    image a function of its own Request only (the REST model does that).

    Safe to call concurrently on one ``pipe``: the call runs on ``private_pipeline(pipe)``
    and leaves ``pipe`` untouched. ``deadline`` (a ``time.monotonic()`` value) stops the
    work with ``TimeoutError`` at the next denoising step after it passes, so a request
    nobody waits for any more does not keep the worker busy. ``control``: (control image,
    conditioning scale) for every request, on a ``StableDiffusionControlNetPipeline``
    (``inference/control.py``: ``load_control``, ``with_controlnet``). ``progress(1)``
    follows each batch's every step (``total_steps`` calls in all): the playground's bar."""
    own = private_pipeline(pipe)
    extra = backbones.of_pipeline(pipe).call_kwargs(pipe)
    watched = deadline is not None or progress is not None
    callback = _step_callback(deadline, progress) if watched else None
    out: list[Image.Image | None] = [None] * len(requests)
    for (steps, guidance, negative, width, height), chunk in _batches(pipe, requests, batch_size):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("generation stopped before a batch: past its deadline")
        result = own(
            prompt=[requests[i].prompt for i in chunk],
            negative_prompt=[negative] * len(chunk) if negative or guidance > 1 else None,
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            generator=[torch.Generator().manual_seed(requests[i].seed) for i in chunk],
            output_type="pil",
            callback_on_step_end=callback,
            **extra,
            **_control_kwargs(control, len(chunk)),
        )
        for i, img in zip(chunk, result.images, strict=True):
            out[i] = img
    return out  # type: ignore[return-value]
