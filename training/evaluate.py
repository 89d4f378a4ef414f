"""Phase ``evaluate``: assemble the text-to-image pipeline, sample the evaluation prompt
set and score it.

Metrics (all offline, with Kiln's own models): the attribute oracle of the built-in
sets (per attribute, all-attributes, seen vs held-out compositions), CLIP score
(cosine of prompt and image embeddings from Kiln's CLIP), Fréchet distance and CMMD to
held-out real images in CLIP image space, and VAE reconstruction PSNR on held-out
images. Pictures: a sample grid, a guidance sweep, a denoising trajectory and a
steps-vs-quality table per scheduler (``evaluate_extras``); everything lands in one
self-contained HTML report.
"""

from __future__ import annotations

import base64
import functools
import html
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from training import mechanics as M
from training.config import Params


def prompt_set(params: Params, clean_dir: Path) -> list:
    from training import builtin, shards

    ds = params.ingest.dataset
    if ds in ("shapes", "digits"):
        prompts = builtin.eval_prompts(ds)
    else:  # user data: distinct captions of the validation split
        caps = dict.fromkeys(r.caption for r in shards.read(shards.shard_paths(clean_dir / "val")))
        prompts = [builtin.EvalPrompt(c, {}) for c in caps]
    if params.evaluate.max_prompts:
        prompts = prompts[: params.evaluate.max_prompts]
    return prompts


@functools.lru_cache(maxsize=2)
def load_clip(clip_dir: Path):
    """Kiln's CLIP and tokenizer, loaded once per evaluation (many scores use them)."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(clip_dir).eval().to(M.device())
    return model, CLIPTokenizer.from_pretrained(clip_dir)


@torch.no_grad()
def clip_scores(clip_dir: Path, prompts: list[str], images: list) -> np.ndarray:
    from training.clip import embed, encode_text
    from training.images import to_tensor

    model, tok = load_clip(Path(clip_dir))
    px = to_tensor(np.stack([np.asarray(i.convert("RGB")) for i in images]))
    img_e = embed(model, pixels=px)
    txt_e = embed(model, ids=encode_text(tok, prompts))
    return (img_e * txt_e).sum(-1).numpy()


@torch.no_grad()
def reconstruction_scores(
    vae_dir: Path, clean_dir: Path, oracle, limit: int = 512
) -> dict[str, float]:
    """VAE reconstruction PSNR on held-out images and, for the built-in sets, the
    oracle's all-attributes accuracy on those real images and on their reconstructions.

    The two accuracies are ceilings for the samples: a generated image is decoded by the
    same VAE, so it cannot score better than the VAE's reconstructions of real images
    (an L1-trained VAE that greyed out red and green capped colour accuracy at ~0.7).
    """
    import itertools
    import json

    from diffusers import AutoencoderKL
    from PIL import Image

    from training import shards
    from training.images import psnr, to_tensor, to_uint8

    dev = M.device()
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().to(dev)
    records = list(itertools.islice(shards.read(shards.shard_paths(clean_dir / "val")), limit))
    x = to_tensor(np.stack([np.asarray(r.image(), dtype=np.uint8) for r in records]))
    rec = torch.cat(
        [vae(b.to(dev), sample_posterior=False).sample.clamp(-1, 1).cpu() for b in x.split(128)]
    )
    out = {"vae_psnr": float(np.mean(psnr(rec, x)))}
    if oracle is None:
        return out
    # Built-in samples carry their ground truth through img2dataset as the `meta` column.
    truths = [json.loads(r.meta.get("meta") or "{}") for r in records]
    for name, batch in (("real", x), ("vae_recon", rec)):
        hits = [
            oracle.score(Image.fromarray(u8), t)["all"]
            for u8, t in zip(to_uint8(batch), truths, strict=True)
            if t
        ]
        if hits:
            out[f"ceiling_acc_all_{name}"] = float(np.mean(hits))
    return out


def _img_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def write_report(
    out: Path,
    metrics: dict,
    images: dict[str, Path],
    title: str,
    tables: dict[str, str] | None = None,
) -> Path:
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>"
        if isinstance(v, float)
        else f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in metrics.items()
    )
    figs = "".join(
        f"<figure>{_img_tag(p)}<figcaption>{html.escape(cap)}</figcaption></figure>"
        for cap, p in images.items()
    )
    figs += "".join(f"<h2>{html.escape(cap)}</h2>{table}" for cap, table in (tables or {}).items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;background:#fafafa}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px}}
img{{image-rendering:pixelated;max-width:100%}}figure{{margin:1.5em 0}}</style></head>
<body><h1>{html.escape(title)}</h1><h2>Metrics</h2><table>{rows}</table>{figs}</body></html>"""
    out.write_text(page)
    return out


def run(
    params: Params,
    clean_dir: Path,
    vae_dir: Path,
    clip_dir: Path,
    unet_dir: Path,
    out_dir: Path,
    log: M.MetricLogger | None = None,
) -> dict:
    from training import oracle as O
    from training import sampling
    from training.images import grid

    log = log or M.NullLogger()
    c = params.evaluate
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = sampling.assemble(vae_dir, clip_dir, unet_dir, scheduler=c.scheduler)
    pipe_dir = out_dir / "pipeline"
    pipe.save_pretrained(pipe_dir, safe_serialization=True)
    pipe = sampling.load(pipe_dir)  # evaluate exactly what was saved

    prompts = prompt_set(params, clean_dir)
    requests = [
        sampling.Request(
            p.prompt,
            seed=params.seed + 1000 * j + i,
            steps=c.steps,
            guidance=c.guidance,
            negative=c.negative_prompt,
        )
        for j in range(c.samples_per_prompt)
        for i, p in enumerate(prompts)
    ]
    truths = [p for _ in range(c.samples_per_prompt) for p in prompts]
    M.say(
        f"evaluate: {len(requests)} samples ({len(prompts)} prompts x "
        f"{c.samples_per_prompt}), {c.scheduler} {c.steps} steps, guidance {c.guidance}"
    )
    import time

    t0 = time.perf_counter()
    images = sampling.generate(pipe, requests, batch_size=c.batch_size)
    gen_s = time.perf_counter() - t0

    metrics: dict = {"samples": len(images), "images_per_s": len(images) / gen_s}
    oracle = O.for_dataset(params.ingest.dataset, params.seed)
    if oracle is not None:
        hits: dict[str, list[float]] = defaultdict(list)
        for img, truth in zip(images, truths, strict=True):
            score = oracle.score(img, truth.truth)
            group = "held_out" if truth.held_out else "seen"
            for attr, ok in score.items():
                hits[f"acc_{attr}"].append(float(ok))
                hits[f"acc_{attr}_{group}"].append(float(ok))
        metrics.update({k: float(np.mean(v)) for k, v in sorted(hits.items())})
    metrics["clip_score"] = float(
        np.mean(clip_scores(clip_dir, [r.prompt for r in requests], images))
    )
    metrics.update(reconstruction_scores(vae_dir, clean_dir, oracle))

    import itertools

    from training import evaluate_extras as X
    from training import shards

    # distribution distance to held-out real images, in Kiln's CLIP image space; the
    # same distance between the two halves of the real set, at the same sample size,
    # says how low it can go
    real = [
        r.image() for r in itertools.islice(shards.read(shards.shard_paths(clean_dir / "val")), 512)
    ]
    gen_e = X.clip_image_embeddings(clip_dir, images)
    real_e = X.clip_image_embeddings(clip_dir, real)
    metrics.update(X.distribution_metrics(gen_e, real_e))
    for k, why in metrics.items():
        if k.endswith("_skipped"):
            M.say(f"evaluate: {k.removesuffix('_skipped')} skipped: {why}")

    figures: dict[str, Path] = {}
    tables: dict[str, str] = {}
    if c.sweep_prompts:
        stride = max(1, len(prompts) // c.sweep_prompts)
        subset = prompts[::stride][: c.sweep_prompts]
        sweep = out_dir / "guidance_sweep.png"
        X.guidance_sweep(
            pipe, [p.prompt for p in subset[:6]], c.sweep_guidance, params.seed, c.steps
        ).save(sweep)
        figures[
            "Guidance sweep: columns are guidance "
            + ", ".join(f"{g:g}" for g in c.sweep_guidance)
            + "; rows: "
            + "; ".join(p.prompt for p in subset[:6])
        ] = sweep
        traj = out_dir / "trajectory.png"
        X.trajectory(pipe, subset[0].prompt, params.seed, c.steps, c.guidance).save(traj)
        figures[
            f"Denoising trajectory of '{subset[0].prompt}' ({c.scheduler}, {c.steps} steps): "
            "top, the noisy latents after each step; bottom, the sampler's clean estimate"
        ] = traj
        rows = X.steps_table(pipe, subset, c.sweep_steps, c.guidance, params.seed, oracle, clip_dir)
        M.write_json(out_dir / "steps_table.json", rows)
        tables[
            f"Steps vs quality per scheduler ({len(subset)} prompts, guidance {c.guidance:g})"
        ] = X.table_html(rows)
        for path in (sweep, traj, out_dir / "steps_table.json"):
            log.log_image(path)

    n_show = min(len(prompts), 24)
    rows = [
        images[j * len(prompts) + i] for i in range(n_show) for j in range(c.samples_per_prompt)
    ]
    grid_path = out_dir / "samples.png"
    grid(rows, nrow=c.samples_per_prompt * 4, scale=3).save(grid_path)
    log.log_image(grid_path)
    legend = "; ".join(
        f"row {i // 4 + 1}.{i % 4 + 1}: {p.prompt}" for i, p in enumerate(prompts[:n_show])
    )
    write_report(
        out_dir / "report.html",
        metrics,
        {f"Samples ({legend})": grid_path, **figures},
        title=f"Kiln evaluation — {params.ingest.dataset}, profile {params.profile}",
        tables=tables,
    )
    summary = {
        k: (f"{v:.3f}" if isinstance(v, float) else v)
        for k, v in metrics.items()
        if k
        in (
            "acc_all",
            "acc_all_seen",
            "acc_all_held_out",
            "clip_score",
            "vae_psnr",
            "ceiling_acc_all_vae_recon",
            "fd_clip",
            "cmmd_clip",
        )
    }
    M.say(f"evaluate: {summary}")
    return metrics
