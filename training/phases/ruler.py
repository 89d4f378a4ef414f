"""Training and registering the fixed ruler CLIP (``kiln ruler``; what a ruler is and why:
``training/evaluation/ruler.py``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from training import engine as E
from training.config import Params
from training.evaluation.ruler import DEFAULT_SEED, RULER_MODEL

__all__ = ["DEFAULT_SEED", "RULER_MODEL", "collection", "describe", "make", "train"]


def ruler_params(params: Params, steps: int, seed: int) -> Params:
    """The pipeline's params with the ruler's seed and CLIP steps (and no ``reuse``)."""
    c = params.train_clip.model_copy(update={"steps": steps, "reuse": None})
    return params.model_copy(update={"seed": seed, "train_clip": c})


def train(params: Params, clean: str | Path, out_dir: Path, ckpt_dir: Path,
          steps: int, seed: int, log: E.MetricLogger | None = None) -> dict:  # fmt: skip
    """Train the ruler: the profile's CLIP, ``steps`` steps from ``seed``, on the clean
    split at ``clean``, into ``out_dir`` (resumable from ``ckpt_dir``, which the caller
    removes once the ruler is safe: ``make`` after registering). Nothing of the
    pipeline's configuration but the CLIP's architecture and data carries over: no
    ``reuse``, no ``mode: continue``."""
    from training.phases import clip

    out_dir.mkdir(parents=True, exist_ok=True)
    return clip.run(ruler_params(params, steps, seed), clean, out_dir, ckpt_dir, log)


def collection(clean: str | Path) -> str:
    """The fingerprint of the clean train split the ruler learned from (a tag: the
    ruler stays valid as the collection grows, but says what it saw)."""
    from training.engine.loaders import Store

    return Store.shared().index(f"{clean}/train").fingerprint()


def make(params: Params, clean: Path, out_dir: Path, ckpt_dir: Path, steps: int,
         seed: int) -> tuple[str, dict]:  # fmt: skip
    """Train the ruler (``train``) inside its own MLflow run (per-step metrics as any
    stage's) and register it as a new ``kiln-ruler`` version, tagged with what it
    learned from; (version, metrics)."""
    from training.tracking.registry import register_dir
    from training.tracking.runs import stage_run

    tags = {"ruler.collection": collection(clean), "ruler.seed": str(seed),
            "ruler.steps": str(steps), "ruler.profile": params.profile}  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = out_dir / "resolved_params.json"  # logged with the run and the model
    own = ruler_params(params, steps, seed).to_dict()
    E.write_json(resolved, own)
    # the run's params: the ruler's seed and its CLIP section (steps, widths)
    with stage_run("ruler", {**own, "ruler": own["train_clip"]}, resolved) as tr:
        tr.set_tags(tags)
        metrics = train(params, clean, out_dir, ckpt_dir, steps, seed, tr)
        tr.log_metrics(metrics)  # numbers only
        numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        version = register_dir(tr, RULER_MODEL, out_dir, numeric, tags)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # registered: nothing left to resume
    return version, metrics


def describe(out_dir: Path) -> str:
    """What a ruler is, from its resolved params (for the console)."""
    p = json.loads((out_dir / "resolved_params.json").read_text())
    return f"seed {p['seed']}, {p['train_clip']['steps']} steps, profile {p['profile']}"
