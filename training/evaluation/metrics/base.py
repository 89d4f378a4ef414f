"""What every metric gets: the generated samples and where the models and data are."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.config import Params


@dataclass(frozen=True)
class Samples:
    params: Params
    images: list  # the generated PIL images
    prompts: list[str]  # the prompt of each image
    truths: list  # the EvalPrompt of each image (ground truth of the built-in sets)
    oracle: Any  # the dataset's attribute oracle, None for user data
    clean_dir: Path
    vae_dir: Path
    clip_dir: Path
    # the CLIP the distribution metrics use (evaluate.ruler), None: ``clip_dir``
    ruler_dir: Path | None = None
