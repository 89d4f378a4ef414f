"""The evaluation's pictures and distribution metrics, beyond per-sample scores.

- **Guidance sweep**: the same prompts and seeds at each guidance scale, one column per
  scale, to see what classifier-free guidance buys and where it overshoots.
- **Denoising trajectory**: one sample's predicted clean image (x0) at every sampler
  step, decoded by the VAE: noise -> blur -> shape -> clean.
- **Steps vs quality**: every scheduler at several step counts on a fixed prompt subset,
  scored by the oracle (built-in sets) and CLIP score, with images/s.
- **Fréchet distance and CMMD in CLIP space**: generated vs held-out real images,
  embedded by Kiln's own CLIP image tower (no downloaded Inception or DINO weights).
  FD is Heusel et al.'s formula on those embeddings; CMMD is Jayasumana et al.'s MMD
  with a Gaussian kernel (sigma 10, result x 1000) on normalised CLIP embeddings. Both
  depend on sample size, so the caller compares equal-sized sets.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from training import mechanics as M


def guidance_sweep(pipe, prompts: list[str], scales: tuple[float, ...], seed: int, steps: int):
    from training import sampling
    from training.images import grid

    reqs = [
        sampling.Request(p, seed=seed + i, steps=steps, guidance=g)
        for i, p in enumerate(prompts)
        for g in scales
    ]
    return grid(sampling.generate(pipe, reqs), nrow=len(scales), scale=3)


@torch.no_grad()
def trajectory(pipe, prompt: str, seed: int, steps: int, guidance: float):
    """One sample through the sampler, decoded after every step. Top row: the noisy
    latents x_t (noise -> blur -> shape -> clean); bottom row: the sampler's estimate of
    the clean image at that step where it keeps one (DPM-Solver++), else x_t again."""
    from PIL import Image

    from training.images import grid, to_uint8

    noisy: list[torch.Tensor] = []
    clean: list[torch.Tensor] = []

    def grab(p, i, t, kw):
        noisy.append(kw["latents"][-1:].clone())
        outs = getattr(p.scheduler, "model_outputs", None)
        est = outs[-1] if outs and outs[-1] is not None else kw["latents"]
        clean.append(est[-1:].clone())
        return kw

    pipe(
        prompt=[prompt],
        negative_prompt=[""],
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(seed)],
        callback_on_step_end=grab,
        callback_on_step_end_tensor_inputs=["latents"],
        output_type="latent",
    )
    scaling = pipe.vae.config.scaling_factor
    frames = torch.cat(noisy + clean).to(pipe.vae.device)
    decoded = pipe.vae.decode(frames / scaling).sample.clamp(-1, 1).cpu()
    images = [Image.fromarray(u) for u in to_uint8(decoded)]
    return grid(images, nrow=len(noisy), scale=3)


def steps_table(
    pipe, prompts: list, steps: tuple[int, ...], guidance: float, seed: int, oracle, clip_dir: Path
) -> list[dict]:
    """One row per (scheduler, steps): oracle all-attributes accuracy (built-in sets),
    CLIP score and images/s. The pipeline's own scheduler is restored afterwards."""
    from training import sampling
    from training.evaluate import clip_scores

    original = pipe.scheduler
    rows = []
    try:
        for name in sampling.SCHEDULERS:
            sampling.set_scheduler(pipe, name)
            for n in steps:
                reqs = [
                    sampling.Request(p.prompt, seed=seed + i, steps=n, guidance=guidance)
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
                M.say(
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


def distribution_metrics(gen_e: np.ndarray, real_e: np.ndarray) -> dict:
    """fd_clip, cmmd_clip and their real-halves floors, or, when the sets are too small,
    ``<metric>_skipped`` reasons in their place (the report and the metrics JSON show
    them; MLflow gets numbers only). FD is biased by sample size, so the generated set
    and the other real half are compared with one real half at a common size ``m``."""
    ref, other = real_e[0::2], real_e[1::2]
    m = min(len(gen_e), len(ref), len(other))
    names = ("fd_clip", "cmmd_clip", "fd_clip_real_halves", "cmmd_clip_real_halves")
    if m < MIN_SAMPLES:
        why = (
            f"needs >= {MIN_SAMPLES} val images per half ({2 * MIN_SAMPLES} in all), have "
            f"{len(real_e)} val images and {len(gen_e)} samples; raise validate.val_fraction "
            "or add images"
        )
        return {f"{name}_skipped": why for name in names}
    return {
        "fd_clip": frechet_distance(gen_e[:m], ref[:m]),
        "cmmd_clip": cmmd(gen_e[:m], ref[:m]),
        "fd_clip_real_halves": frechet_distance(other[:m], ref[:m]),
        "cmmd_clip_real_halves": cmmd(other[:m], ref[:m]),
        "fd_samples": m,
    }


@torch.no_grad()
def clip_image_embeddings(clip_dir: Path, images: list) -> np.ndarray:
    from training.clip import embed
    from training.evaluate import load_clip
    from training.images import to_tensor

    model, _ = load_clip(Path(clip_dir))
    px = to_tensor(np.stack([np.asarray(i.convert("RGB")) for i in images]))
    return embed(model, pixels=px).numpy().astype(np.float64)


# Fewest embeddings per set FD and CMMD are defined for: a covariance (FD) and the
# unbiased MMD's m*(m-1) pairs (CMMD) need two; with one, sqrtm fails inside SciPy.
MIN_SAMPLES = 2


def _check_sets(metric: str, a: np.ndarray, b: np.ndarray) -> None:
    """A clear ValueError instead of a crash inside SciPy or a division by zero."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{metric}: needs two [n, d] sets of one width, got {a.shape} and {b.shape}"
        )
    if min(len(a), len(b)) < MIN_SAMPLES:
        raise ValueError(
            f"{metric}: needs at least {MIN_SAMPLES} embeddings per set, got {len(a)} and {len(b)}"
        )


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Heusel et al.'s Fréchet distance between the Gaussians fitted to ``a`` and ``b``."""
    from scipy import linalg

    _check_sets("frechet_distance", a, b)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # plain sqrtm(): SciPy 1.18 removed the `disp` argument that older FID code passes
    covmean = np.real(linalg.sqrtm(cov_a @ cov_b))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def cmmd(a: np.ndarray, b: np.ndarray, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """Unbiased MMD^2 with a Gaussian RBF kernel, times ``scale`` (the CMMD paper's)."""
    _check_sets("cmmd", a, b)
    gamma = 1.0 / (2 * sigma**2)

    def k(x, y):
        d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
        return np.exp(-gamma * d)

    m, n = len(a), len(b)
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    term_a = (kaa.sum() - np.trace(kaa)) / (m * (m - 1))
    term_b = (kbb.sum() - np.trace(kbb)) / (n * (n - 1))
    return float(scale * (term_a + term_b - 2 * kab.mean()))
