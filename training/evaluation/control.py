"""Does the ControlNet's control work, and does the text still matter?

Real val images become controls (their edge maps, made by the training detector), each
sampled with and without the ControlNet from the same prompt and seed. The prompt keeps
the picture's shape and changes its colour (``a {other colour} {shape}``, a caption form
the built-in shapes train on) and leaves out size and position: those only the control
carries. The shapes oracle reads the val image (the truth of the control) and both
samples: *control-following* is the sample's size and position (and shape) matching the
control's, *text-following* its colour matching the prompt's. The base model alone is the
baseline: from this prompt it can only guess where and how large. For data without the
shapes oracle the same samples go into the report's table with their val captions as
prompts, unscored.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training import engine as E
from training.config import Params
from training.engine.images import grid
from training.evaluation.figures import _tag, table_html
from training.inference.control import with_controlnet
from training.inference.sampling import assemble, finite_images

ATTRS = ("shape", "size", "position")  # read from the control image
SHOWN = 8  # rows of the grid and the report table


def other_colour(colour: str, shape: str, rng: np.random.Generator) -> str:
    """A colour other than ``colour`` that the training data pairs with ``shape`` (the
    held-out pairs test composition, which is the evaluate stage's question)."""
    from training.intake.builtin import COLOURS, HELD_OUT_PAIRS

    choices = [c for c in COLOURS if c != colour and (c, shape) not in HELD_OUT_PAIRS]
    return choices[int(rng.integers(len(choices)))]


def _sample(pipe, prompts, seeds, sizes, params: Params, arm: str, **extra) -> list[Image.Image]:
    """One picture a prompt at its control's size (``sizes``: (width, height) each; a
    batch never mixes sizes): a wide control drawn at the square default size would be
    squashed, with and without the ControlNet. NaN pictures are ``NonFiniteSamples``
    naming the ``arm`` that drew them (were: drawn black and scored as samples)."""
    e, out, i = params.evaluate, [], 0
    while i < len(prompts):
        n = 1
        while n < e.batch_size and i + n < len(prompts) and sizes[i + n] == sizes[i]:
            n += 1
        chunk = {k: v[i : i + n] for k, v in extra.items() if isinstance(v, list)}
        arrays = pipe(
            prompt=prompts[i : i + n],
            negative_prompt=[e.negative_prompt] * n,
            num_inference_steps=e.steps,
            guidance_scale=e.guidance,
            generator=[torch.Generator().manual_seed(s) for s in seeds[i : i + n]],
            width=sizes[i][0],
            height=sizes[i][1],
            output_type="np",  # made PIL by finite_images, once checked
            **{k: v for k, v in extra.items() if not isinstance(v, list)},
            **chunk,
        ).images
        out += finite_images(arrays, prompts[i : i + n], f"train_controlnet evaluation, {arm}")
        i += n
    return out


def evaluate_control(
    params: Params,
    dirs: tuple[Path, Path, Path],
    controlnet,
    out_dir: Path,
    split,
    log: E.MetricLogger,
) -> dict:
    """Sample ``eval_samples`` val controls (``split``: the val images with their control
    maps and captions, read in order) with and without ``controlnet`` (the models in
    ``dirs`` = VAE, CLIP, U-Net folders); metrics, ``control_eval.png`` (rows: control,
    real, without, with), its prompts in ``control_eval.json`` and ``control_report.html``
    in ``out_dir``."""
    from training.evaluation import oracle as O

    c = params.train_controlnet
    base = assemble(*dirs, scheduler=params.evaluate.scheduler)
    base.set_progress_bar_config(disable=True)
    dev = E.device()
    base.to(dev)
    rows: list[tuple[Image.Image, Image.Image, str]] = []  # real, control, caption
    try:
        for b in split.scan(64, limit=c.eval_samples):
            for x, m, cap in zip(b["x"], b["control"], b["caption"], strict=True):
                rows.append((Image.fromarray(np.asarray(x)), Image.fromarray(np.asarray(m)), cap))
    finally:
        split.close()
    if not rows:
        return {"control_eval_skipped": "no val images"}
    shapes = O.grader(params) if params.oracle() == "shapes" else None
    rng = np.random.default_rng(params.seed)
    truths = [shapes.read(real) if shapes else None for real, _, _ in rows]
    prompts = [
        f"a {other_colour(t.colour, t.shape, rng)} {t.shape}" if t and t.found else cap
        for t, (_, _, cap) in zip(truths, rows, strict=True)
    ]
    seeds = [params.seed * 100_000 + i for i in range(len(rows))]
    E.say(f"train_controlnet: sampling {len(rows)} val controls with and without the ControlNet")
    sizes = [real.size for real, _, _ in rows]
    without = _sample(base, prompts, seeds, sizes, params, "the U-Net alone")
    pipe = with_controlnet(base, controlnet.eval().to(dev))
    controls = [m for _, m, _ in rows]
    steer = {"image": controls, "controlnet_conditioning_scale": c.conditioning_scale}
    with_cn = _sample(pipe, prompts, seeds, sizes, params, "with the ControlNet", **steer)
    metrics: dict = {"control_eval_samples": len(rows)}
    if shapes is not None:
        metrics.update(_scores(shapes, truths, prompts, without, with_cn))
        log.log_metrics({f"train_controlnet/{k}": v for k, v in metrics.items()})
    shown = range(min(SHOWN, len(rows)))
    tiles = [t for i in shown for t in (controls[i], rows[i][0], without[i], with_cn[i])]
    grid(tiles, nrow=4, scale=2).save(out_dir / "control_eval.png")
    log.log_image(out_dir / "control_eval.png", "controlnet")
    # the grid's prompts and scores, for the evaluate stage's report (the ControlNet
    # ships with the pipeline: inference/control.py, ship)
    E.write_json(out_dir / "control_eval.json", {"prompts": [prompts[i] for i in shown], **metrics})
    _report(out_dir / "control_report.html", rows, prompts, without, with_cn, metrics)
    return metrics


def grade(shapes, truths, prompts: list[str], images: list) -> dict[str, float]:
    """Control- and text-following of ``images``: each control attribute and all three
    matching the control's reading (``truths``: the oracle's, ``layout``), and the
    colour matching the prompt's (``a {colour} {shape}``). Controls the oracle could not
    read are left out."""
    hits: dict[str, list[bool]] = {a: [] for a in (*ATTRS, "layout", "colour")}
    for t, prompt, img in zip(truths, prompts, images, strict=True):
        if not t.found:
            continue
        r = shapes.read(img)
        ok = {
            "shape": r.found and r.shape == t.shape,
            "size": r.found and r.size == t.size,
            "position": r.found and (r.row, r.col) == (t.row, t.col),
        }
        for a in ATTRS:
            hits[a].append(ok[a])
        hits["layout"].append(all(ok.values()))
        hits["colour"].append(r.found and r.colour == prompt.split()[1])
    return {a: float(np.mean(v)) for a, v in hits.items() if v}


def _scores(shapes, truths, prompts, without, with_cn) -> dict[str, float]:
    """``grade`` per arm: the base model alone, and with the ControlNet."""
    out: dict[str, float] = {}
    for arm, images in (("base", without), ("controlnet", with_cn)):
        out.update({f"{arm}_{a}": v for a, v in grade(shapes, truths, prompts, images).items()})
    return out


def _report(path: Path, rows, prompts, without, with_cn, metrics: dict) -> None:
    body = "".join(
        f"<tr><td>{html.escape(prompts[i])}</td><td>{_tag(rows[i][1])}</td>"
        f"<td>{_tag(rows[i][0])}</td><td>{_tag(without[i])}</td><td>{_tag(with_cn[i])}</td></tr>"
        for i in range(min(SHOWN * 2, len(rows)))
    )
    table = (
        "<table><tr><th>prompt</th><th>control (edges)</th><th>real (val)</th>"
        f"<th>without ControlNet</th><th>with ControlNet</th></tr>{body}</table>"
    )
    scores = table_html([{"metric": k, "value": v} for k, v in metrics.items()])
    path.write_text(
        "<!doctype html><meta charset='utf-8'><title>Kiln ControlNet</title>"
        "<h1>ControlNet: control and text</h1>"
        "<p>Each val image's edge map is the control; the prompt keeps its shape and names "
        "another colour, and omits size and position (the control carries those).</p>"
        f"{scores}{table}"
    )
