"""The evaluation's pictures and tables, beyond the metrics.

- **Guidance sweep**: the same prompts and seeds at each guidance scale, one column per
  scale, to see what classifier-free guidance buys and where it overshoots.
- **Denoising trajectory**: one sample's predicted clean image (x0) at every sampler
  step, decoded by the VAE: noise -> blur -> shape -> clean.
- **Steps vs quality**: every scheduler at several step counts on a fixed prompt subset,
  scored by the oracle (built-in sets) and CLIP score, with images/s.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from training import engine as E


def guidance_sweep(
    pipe, prompts: list[str], scales: tuple[float, ...], seed: int, steps: int, negative: str = ""
):
    """``negative``: evaluate.negative_prompt, as the evaluation's samples are drawn."""
    from training.engine.images import grid
    from training.inference import sampling

    reqs = [
        sampling.Request(p, seed=seed + i, steps=steps, guidance=g, negative=negative)
        for i, p in enumerate(prompts)
        for g in scales
    ]
    return grid(sampling.generate(pipe, reqs), nrow=len(scales), scale=3)


@torch.no_grad()
def trajectory(
    pipe, prompt: str, seed: int, steps: int, guidance: float, start: float = 0.0,
    negative: str = "",
):  # fmt: skip
    """One sample through the sampler, decoded after every step. Top row: the noisy
    latents x_t (noise -> blur -> shape -> clean); bottom row: the sampler's estimate of
    the clean image at that step where it keeps one (DPM-Solver++), else x_t again.
    ``start``: the guidance_start it is served at (the noisiest steps unguided);
    ``negative``: evaluate.negative_prompt."""
    from PIL import Image

    from training import backbones
    from training.engine.images import grid, to_uint8
    from training.inference import sampling

    own, _ = sampling.guided(pipe, steps, guidance, start)

    noisy: list[torch.Tensor] = []
    clean: list[torch.Tensor] = []

    def grab(p, i, t, kw):
        noisy.append(kw["latents"][-1:].clone())
        outs = getattr(p.scheduler, "model_outputs", None)
        est = outs[-1] if outs and outs[-1] is not None else kw["latents"]
        clean.append(est[-1:].clone())
        p._kiln_step = i + 1  # the guidance interval's step (sampling.in_interval)
        return kw

    own(
        prompt=[prompt],
        negative_prompt=[negative],
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(seed)],
        callback_on_step_end=grab,
        callback_on_step_end_tensor_inputs=["latents"],
        output_type="latent",
        **backbones.of_pipeline(pipe).call_kwargs(pipe),
    )
    scaling = pipe.vae.config.scaling_factor
    frames = torch.cat(noisy + clean).to(pipe.vae.device)
    decoded = pipe.vae.decode(frames / scaling).sample.clamp(-1, 1).cpu()
    images = [Image.fromarray(u) for u in to_uint8(decoded)]
    return grid(images, nrow=len(noisy), scale=3)


def steps_table(
    pipe, prompts: list, steps: tuple[int, ...], guidance: float, seed: int, oracle,
    clip_dir: Path, start: float = 0.0, negative: str = "",
) -> list[dict]:  # fmt: skip
    """One row per (scheduler, steps): oracle all-attributes accuracy (built-in sets),
    CLIP score and images/s, at ``guidance`` from ``start`` on with the evaluation's
    ``negative`` prompt. The pipeline's own scheduler is restored afterwards."""
    from training.evaluation.metrics.clip_score import clip_scores
    from training.inference import sampling

    original = pipe.scheduler
    rows = []
    try:
        for name in sampling.scheduler_names(original.config):
            sampling.set_scheduler(pipe, name)
            for n in steps:
                reqs = [
                    sampling.Request(
                        p.prompt,
                        seed=seed + i,
                        steps=n,
                        guidance=guidance,
                        negative=negative,
                        guidance_start=start,
                    )  # fmt: skip
                    for i, p in enumerate(prompts)
                ]
                t0 = time.perf_counter()
                images = sampling.generate(pipe, reqs)
                rate = len(images) / (time.perf_counter() - t0)
                row = {
                    "scheduler": name,
                    "steps": n,
                    "images_per_s": rate,
                    "clip_score": float(
                        np.mean(clip_scores(clip_dir, [r.prompt for r in reqs], images))
                    ),
                }
                if oracle is not None:
                    row["acc_all"] = float(
                        np.mean(
                            [
                                oracle.score(img, p.truth)["all"]
                                for img, p in zip(images, prompts, strict=True)
                            ]
                        )
                    )
                rows.append(row)
                E.say(
                    f"evaluate: steps table {name} {n} steps: "
                    + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float))
                )
    finally:
        pipe.scheduler = original
    return rows


def table_html(rows: list[dict]) -> str:
    import html

    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{v:.3f}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>"
            for v in (r.get(c) for c in cols)
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _tag(img, scale: int = 3) -> str:
    """A PIL image as an inline <img>, enlarged (nearest) so small images are visible."""
    import base64
    import io

    from PIL import Image

    img = img.convert("RGB")
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def captions_table(rows: list[tuple[str, object, list]]) -> str:
    """One row per val caption: the caption, its real image, the samples made from it
    (people judge a model on real data by this side by side, not by a number)."""
    import html

    body = "".join(
        f"<tr><td style='max-width:320px'>{html.escape(caption)}</td>"
        f"<td>{_tag(real) if real is not None else ''}</td>"
        f"<td>{''.join(_tag(s) for s in samples)}</td></tr>"
        for caption, real, samples in rows
    )
    return f"<table><tr><th>caption</th><th>real (val)</th><th>samples</th></tr>{body}</table>"


def copies_table(pairs: list[tuple[object, np.ndarray, float]], threshold: float) -> str:
    """Samples flagged as copies, each beside the training image it is closest to."""
    from PIL import Image

    if not pairs:
        return f"<p>No sample is within {threshold:g} RMS of a training image.</p>"
    body = "".join(
        f"<tr><td>{_tag(sample)}</td><td>{_tag(Image.fromarray(train))}</td><td>{d:.4f}</td></tr>"
        for sample, train, d in pairs
    )
    return (
        "<table><tr><th>sample</th><th>nearest training image</th><th>RMS distance</th></tr>"
        f"{body}</table>"
    )
