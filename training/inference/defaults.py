"""The sampler settings a saved pipeline carries for callers that give none.

Its sampler is the scheduler it was saved with (``evaluate.scheduler``, under which
evaluate chose the guidance): ``kiln generate``, the REST model and the playground all
sample with it unless the caller names another (``scheduler_name`` says which it is).

``evaluate`` writes ``SAMPLER_FILE`` into the pipeline it registers, with the guidance
(scale and ``guidance_start``) it chose for that model and scored it at
(``evaluation/guidance.py``); ``kiln generate``, the REST model and the playground read
it here. A module of its own: the serving code
ships it with the inference package.
"""

from __future__ import annotations

import math
from pathlib import Path

from training.config import SAMPLER, SamplerDefaults

# Written by evaluate into the pipeline it registers (evaluation/guidance.py): the
# sampler settings chosen for this model, which callers that give none default to.
SAMPLER_FILE = "kiln_sampler.json"


# The sampler names (``sampling.SCHEDULERS``, ``FLOW_SCHEDULERS``) of the diffusers classes
# they make: class names, so this module needs no diffusers import
_SAMPLER_NAMES = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "FlowMatchEulerDiscreteScheduler": "euler",
    "DPMSolverMultistepScheduler": "dpm++",
}


def scheduler_name(cls: str, config) -> str:
    """The name ``kiln generate --scheduler`` gives a scheduler of class ``cls`` and
    ``config`` (a pipeline's own, the one it was saved with: ``evaluate.scheduler``), for
    the manifests; one Kiln does not make (a pipeline from elsewhere) by its class."""
    name = _SAMPLER_NAMES.get(cls)
    if name == "dpm++" and (
        config.get("algorithm_type") != "dpmsolver++" or config.get("solver_order") != 2
    ):
        return cls  # another DPM-Solver than Kiln's dpm++
    return name or cls


def recommended(pipe_dir: str | Path) -> SamplerDefaults:
    """``SAMPLER`` with what evaluate chose for the pipeline in ``pipe_dir`` (its
    ``SAMPLER_FILE``; a pipeline saved before there was one keeps ``SAMPLER``). A file
    that is there but unreadable is an error, not a silent fallback."""
    import dataclasses
    import json

    path = Path(pipe_dir) / SAMPLER_FILE
    if not path.is_file():
        return SAMPLER
    try:
        saved = json.loads(path.read_text())
        g = saved["guidance"]
        # a file written before the guidance interval: guided at every step, as it was
        start = saved.get("guidance_start", 0.0)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a Kiln sampler file ({exc})") from None
    if isinstance(g, bool) or not isinstance(g, int | float) or not math.isfinite(g) or g < 0:
        raise ValueError(f"{path}: guidance must be a finite number >= 0, got {g!r}")
    if isinstance(start, bool) or not isinstance(start, int | float) or not 0 <= start < 1:
        raise ValueError(f"{path}: guidance_start must be a fraction in [0, 1), got {start!r}")
    return dataclasses.replace(SAMPLER, guidance=float(g), guidance_start=float(start))
