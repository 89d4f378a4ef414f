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
``step_index``, ``_guidance_scale``, ``_num_timesteps``...), so each batch of a call
builds its own pipeline object and scheduler around the shared, read-only modules. User
input is checked with ``check_request`` (``inference/requests.py``; the CLI and the
pyfunc both call it) before anything is computed.
"""

from __future__ import annotations

import copy
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
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
from training.errors import NonFiniteSamples as NonFiniteSamples

# re-exported (``X as X``): callers know them as sampling.X
from training.inference.requests import MAX_PROMPT_CHARS as MAX_PROMPT_CHARS
from training.inference.requests import MAX_SEED as MAX_SEED
from training.inference.requests import MAX_SIZE_FACTOR as MAX_SIZE_FACTOR
from training.inference.requests import MAX_STEPS as MAX_STEPS
from training.inference.requests import Geometry as Geometry
from training.inference.requests import Request as Request
from training.inference.requests import check_request as check_request

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


# one load at a time in a process: two threads' from_pretrained at once (two playground
# workers, a page's load beside a job's) failed with "Cannot copy out of meta tensor"
_LOADING = threading.Lock()


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
    with _LOADING:  # from_pretrained builds on the meta device, patching torch globally
        # safetensors only: a registry version (anyone who can write to the registry)
        # with a .bin in its place is refused, never unpickled, however restricted
        pipe = DiffusionPipeline.from_pretrained(
            str(path), local_files_only=True, use_safetensors=True, **extra
        )
    pipe.set_progress_bar_config(disable=True)
    backbones.of_pipeline(pipe).prepare(pipe)
    return pipe.to(device())


def set_scheduler(pipe: DiffusionPipeline, name: str) -> None:
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)


def manifest_line(
    file: str, r: Request, image: Image.Image, scheduler: str, model: str, version: str
) -> dict:
    """A picture's ``manifest.jsonl`` line (kiln generate, the playground's gallery).
    The negative prompt is what was drawn with: none at guidance 1, where there is no
    unconditional branch for it to replace (was: recorded as if it had been used)."""
    return {
        "file": file,
        "prompt": r.prompt,
        "seed": r.seed,
        "steps": r.steps,
        "guidance": r.guidance,
        "guidance_start": r.guidance_start,
        "negative_prompt": r.negative if r.guidance > 1 else "",
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


def guided_from(steps: int, start: float) -> int:
    """The first guided step of ``steps`` when the noisiest ``start`` of them run unguided:
    diffusers' guiders' rule (``int(start * steps)``), so a ``start`` means what it
    means there."""
    return int(start * steps)


# the pipeline classes with a guidance interval, one per diffusers class (``in_interval``)
_INTERVAL_CLASSES: dict[type, type] = {}


def in_interval(pipe: DiffusionPipeline, first: int) -> DiffusionPipeline:
    """``pipe`` (a private pipeline) guided only from denoising step ``first`` on.

    diffusers' SD, SD-ControlNet and SD3 pipelines decide once per call, from
    ``_guidance_scale > 1``, to run the unconditional branch, and combine the two
    predictions of every step with the ``guidance_scale`` property. A subclass whose
    property reads 1 before step ``first`` makes those steps the conditional prediction
    alone (uncond + 1 * (cond - uncond)) and leaves the rest of the call as diffusers
    wrote it; ``_step_callback`` advances ``_kiln_step``. The unguided steps still run
    the unconditional branch: their cost is that of a guided step. A caller that passes
    its own ``callback_on_step_end`` sets ``pipe._kiln_step = step + 1`` in it."""
    cls = type(pipe)
    if cls not in _INTERVAL_CLASSES:

        def guidance_scale(self) -> float:
            return self._guidance_scale if self._kiln_step >= self._kiln_first else 1.0

        _INTERVAL_CLASSES[cls] = type(
            f"Interval{cls.__name__}", (cls,), {"guidance_scale": property(guidance_scale)}
        )
    pipe.__class__ = _INTERVAL_CLASSES[cls]
    pipe._kiln_step, pipe._kiln_first = 0, first
    return pipe


def guided(
    pipe: DiffusionPipeline, steps: int, guidance: float, start: float
) -> tuple[DiffusionPipeline, bool]:
    """A private pipeline around ``pipe``'s modules for one call of ``steps`` steps at
    ``guidance`` from ``start`` on, and whether it has an interval (then the call's
    ``callback_on_step_end`` must advance ``_kiln_step``: ``in_interval``)."""
    own = private_pipeline(pipe)
    first = guided_from(steps, start)
    if guidance > 1 and first > 0:
        return in_interval(own, first), True
    return own, False


def _step_callback(deadline: float | None, progress: Callable[[int], None] | None) -> Callable:
    def check(pipe, step: int, timestep, kwargs: dict) -> dict:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"generation stopped at step {step}: past its deadline")
        if progress is not None:
            progress(1)
        if hasattr(pipe, "_kiln_step"):  # a guidance interval (in_interval): the next step
            pipe._kiln_step = step + 1
        return kwargs

    return check


def _batches(
    pipe: DiffusionPipeline, requests: list[Request], batch_size: int
) -> list[tuple[tuple, list[int]]]:
    """Each batch ``generate`` runs: (steps, guidance, guidance_start, negative, width,
    height), indices."""
    geometry = Geometry.of(pipe)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        key = (r.steps, r.guidance, r.guidance_start, r.negative, *geometry.size(r))
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

    Requests sharing (steps, guidance, guidance_start, negative, size) are batched, up to
    ``batch_size``; each image's initial noise comes from its own seed. Batching is not
    bit-exact on CPU: oneDNN chooses convolution algorithms by batch size, so a batched
    image can differ from the same request alone by 1/255 in a few pixels.
    ``batch_size=1`` makes every image a function of its own Request only (the REST model
    does that).

    Safe to call concurrently on one ``pipe``: the call runs on ``private_pipeline(pipe)``
    and leaves ``pipe`` untouched. ``deadline`` (a ``time.monotonic()`` value) stops the
    work with ``TimeoutError`` at the next denoising step after it passes, so a request
    nobody waits for any more does not keep the worker busy. ``control``: (control image,
    conditioning scale) for every request, on a ``StableDiffusionControlNetPipeline``
    (``inference/control.py``: ``load_control``, ``with_controlnet``). ``progress(1)``
    follows each batch's every step (``total_steps`` calls in all): the playground's bar."""
    extra = backbones.of_pipeline(pipe).call_kwargs(pipe)
    out: list[Image.Image | None] = [None] * len(requests)
    batches = _batches(pipe, requests, batch_size)
    for (steps, guidance, start, negative, width, height), chunk in batches:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("generation stopped before a batch: past its deadline")
        own, interval = guided(pipe, steps, guidance, start)
        watched = interval or deadline is not None or progress is not None
        callback = _step_callback(deadline, progress) if watched else None
        result = own(
            prompt=[requests[i].prompt for i in chunk],
            negative_prompt=[negative] * len(chunk) if negative or guidance > 1 else None,
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            generator=[torch.Generator().manual_seed(requests[i].seed) for i in chunk],
            output_type="np",  # "pil" is these arrays made PIL, after the check below
            callback_on_step_end=callback,
            **extra,
            **_control_kwargs(control, len(chunk)),
        )
        prompts = [requests[i].prompt for i in chunk]
        for i, img in zip(chunk, finite_images(result.images, prompts), strict=True):
            out[i] = img
    return out  # type: ignore[return-value]


def finite_images(arrays: np.ndarray, prompts: list[str], where: str = "") -> list[Image.Image]:
    """A pipeline's ``output_type="np"`` batch as PIL images, or ``NonFiniteSamples``
    (its message led by ``where``, when given: which drawing it was): diffusers draws NaN
    as black without a word, and a NaN picture of a broken model (fp16 VAE overflow,
    diverged weights) scored as a black picture, the best possible copy check among
    them. Every Kiln drawing goes through it (``generate``, the ControlNet evaluation,
    the training previews)."""
    bad = [p for p, a in zip(prompts, arrays, strict=True) if not np.isfinite(a).all()]
    if bad:
        raise NonFiniteSamples(
            (f"{where}: " if where else "")
            + f"{len(bad)} of {len(prompts)} samples came out NaN or infinite (first prompt: "
            f"{bad[0][:80]!r}): the model's weights or its precision are broken"
        )
    return DiffusionPipeline.numpy_to_pil(arrays)
