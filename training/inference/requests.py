"""What a sampling request is, and which ones Kiln computes.

``Request`` is one image to draw; ``check_request`` refuses, with a one-line message,
what ``sampling.generate`` should not compute, and ``Geometry`` what a loaded model
cannot draw. A module of its own so the CLI, the REST model and the playground check
requests before they load a model (``sampling`` re-exports them).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from training.config import SAMPLER


@dataclass(frozen=True)
class Request:
    prompt: str
    seed: int
    steps: int = SAMPLER.steps
    guidance: float = SAMPLER.guidance
    negative: str = SAMPLER.negative_prompt
    width: int | None = None  # pixels; None: the size the model was trained at
    height: int | None = None
    # the noisiest fraction of the steps sampled unguided (SamplerDefaults.guidance_start)
    guidance_start: float = SAMPLER.guidance_start


# diffusers' schedulers refuse more inference steps than training timesteps (1000 here).
MAX_STEPS = 1000
# Negative seeds are refused: torch.Generator.manual_seed folds them onto positive ones
# (-1 is 2**64 - 2), so two seeds would name one image. The top is the largest integer
# a double holds exactly with every smaller one (JavaScript's Number.MAX_SAFE_INTEGER):
# a REST column with a null row arrives as float64, and JSON clients such as browsers
# (the playground) hold numbers as doubles, so a larger seed could arrive rounded and
# draw another seed's image. Any integer above it rounds to 2**53 or more, so it is
# refused rather than drawn as its neighbour (a top of 2**53 would take 2**53 + 1 as 2**53).
MAX_SEED = 2**53 - 1
# diffusers runs the unconditional branch only when guidance_scale > 1, so any scale
# below 1 draws exactly the scale-1 picture while the manifest would record the asked
# value: refused, 1 is "off". Pictures over-saturate long before 100 (README: tiny
# shapes over-guide at 4), and a scale past float32's range (1e39) turns the prediction
# into NaN, an all-black picture answered as a success; 100 is the bound `kiln generate
# --guidance` always had.
MIN_GUIDANCE = 1.0
MAX_GUIDANCE = 100.0
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
    steps: a whole number in [1, MAX_STEPS]; guidance: a number in [MIN_GUIDANCE,
    MAX_GUIDANCE] (1: no classifier-free guidance, the plain conditional model; diffusers
    skips guidance at any scale <= 1, so a lower one would be drawn as 1 and recorded
    wrongly); width and height: None or a whole number >= 1 (which sizes a model draws
    is ``Geometry.size``'s check, once the model is loaded).
    guidance_start: a finite fraction in [0, 1) (diffusers' guiders' ``start``).
    Called by the REST/pyfunc model and ``kiln generate`` before loading or computing."""
    for field, text in (("prompt", r.prompt), ("negative_prompt", r.negative)):
        if not isinstance(text, str):
            raise ValueError(f"{field} must be a string, got {type(text).__name__}")
        if len(text) > MAX_PROMPT_CHARS:
            raise ValueError(
                f"{field} is {len(text)} characters long; at most {MAX_PROMPT_CHARS} are allowed"
            )
        try:  # a lone surrogate: JSON's "\ud83d", or argv bytes that are not UTF-8
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # was: the tokenizer's TypeError mid-job
            raise ValueError(
                f"{field} is not valid Unicode text (character {exc.start} is half of a "
                "character, or a byte that is not UTF-8)"
            ) from None
    if not r.prompt.strip():
        raise ValueError("prompt must be a non-empty string")
    if not _whole(r.seed) or not 0 <= r.seed <= MAX_SEED:
        raise ValueError(f"seed must be a whole number in [0, {MAX_SEED}], got {r.seed!r}")
    if not _whole(r.steps) or not 1 <= r.steps <= MAX_STEPS:
        raise ValueError(f"steps must be a whole number in [1, {MAX_STEPS}], got {r.steps!r}")
    g = r.guidance
    # NaN fails both comparisons and infinities the bounds: no separate finiteness test
    if (
        isinstance(g, bool)
        or not isinstance(g, numbers.Real)
        or not MIN_GUIDANCE <= g <= MAX_GUIDANCE
    ):
        raise ValueError(
            f"guidance must be a number in [{MIN_GUIDANCE:g}, {MAX_GUIDANCE:g}] "
            f"(1: no guidance; lower scales draw the same picture as 1), got {g!r}"
        )
    s = r.guidance_start
    if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0 <= s < 1:
        raise ValueError(f"guidance_start must be a fraction in [0, 1), got {s!r}")
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
    # the training timesteps: check_request's bound is 1,000, and a model trained on
    # fewer has fewer to give (was: DPM-Solver++ repeated timesteps and answered a black
    # picture as a success; DDIM and DDPM raised deep inside diffusers)
    timesteps: int = 1000

    @classmethod
    def of(cls, pipe) -> Geometry:
        """A loaded pipeline's (``sampling.load``)."""
        from training import backbones

        vae = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        net = backbones.denoiser(pipe).config
        down = backbones.of_pipeline(pipe).downsampling(net)
        timesteps = int(pipe.scheduler.config.num_train_timesteps)
        return cls(native=int(net.sample_size) * vae, stride=vae * down, timesteps=timesteps)

    @property
    def sizes(self) -> range:
        return range(self.stride, MAX_SIZE_FACTOR * self.native + 1, self.stride)

    def size(self, r: Request) -> tuple[int, int]:
        """``(width, height)`` of a checked request; ``ValueError`` naming what is
        allowed when the model cannot draw it: the sizes, or at most ``timesteps``
        steps."""
        if r.steps > self.timesteps:
            raise ValueError(
                f"steps {r.steps} is more than the {self.timesteps} timesteps this model "
                f"was trained on: at most {self.timesteps}"
            )
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
        """The request's area in trained-size images (1.0 at the native size), and never
        less than 1: a smaller picture's step costs about as much as a trained-size one
        (16 px: 0.87 of 32 px's on this CPU; was: charged 0.25, so a request within the
        budget did 3.5x the work the budget allows)."""
        w, h = self.size(r)
        return max(1.0, w * h / self.native**2)
