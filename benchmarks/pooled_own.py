"""Trained projects' samples against their training images, pooled, each in its own CLIP.

Usage (from the repository root, alone on the machine, on projects that ran ``kiln run``):
    .venv/bin/python benchmarks/pooled_own.py PROJECT [PROJECT ...] [--guidance 1.5,2]
        [--pool 640] [--draws 5] [--ref 1024] [--vae [DIR]] [--sampler NAME:STEPS]
        [--guidance-start F]

Each project is measured with the CLIP it trained and read as the ratio to its own
floor, so runs of different profiles (tiny at 32 px, tiny64 at 64 px, whose CLIPs cannot
embed each other's pictures) are set side by side. Two protocols, each with a floor of
the real images of the same captions (``common_space.train_pool``):

- train captions, pooled: one sample for each of ``--pool`` training captions (seeded
  random, seeds 0...), against ``--ref`` other training images; the floor is the
  captions' own images against the same reference (COCO-style FID on a disjoint real
  reference). Samples that copied their caption's image would flatter it, so each is
  also compared with that image (``own_copies``: evaluate's distance and threshold).
- val captions, per draw: one sample per distinct val caption, each of ``--draws``
  draws against the same reference; the floor is the val images of those captions. No
  training image is involved, but with ~120 captions FD's finite-sample bias is several
  times the pooled floor and hides most of the gap (RESULTS.md "the pooled floor").

``--vae`` adds the pooled images reconstructed by the run's VAE: what a perfect
denoiser's samples could at best be (``--vae DIR``: by another VAE, e.g. one
``benchmarks/vae_curve.py`` trained with other settings; ``--guidance ''`` draws none).
Samples are kept under ``PROJECT/../pooled-samples/<project's name>``, reused only for
the same weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common_space import (  # noqa: E402
    draw,
    first_per_caption,
    pooled,
    real_images,
    train_pool,
)


def reconstruct(vae_dir: Path, images: list) -> list:
    """``images`` encoded (posterior means) and decoded by the VAE in ``vae_dir``: what a
    perfect denoiser's samples could at best look like, so their distance to the
    reference is the part of the samples' distance the VAE alone accounts for (LDM's
    reconstruction FID)."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    from training.engine.images import to_tensor, to_uint8

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 128):
            x = to_tensor(np.stack([np.asarray(im.convert("RGB")) for im in images[i : i + 128]]))
            recon = vae(x, sample_posterior=False).sample
            out += [Image.fromarray(a) for a in to_uint8(recon)]
    return out


def own_copies(project: Path, samples: list, recons: list) -> tuple[int, float]:
    """How many samples drawn for a training caption are copies of that caption's own
    image, and the median distance: evaluate's distance and threshold (RMS in [0, 1] RGB
    to the image as the VAE reconstructs it, ``recons``, under
    ``evaluate.copy_distance``), but against the caption's own image only, not the
    nearest of the whole split (evaluate's memorisation check does that search). Drawing
    for training captions is what makes the pooled floor fair; this says whether those
    samples hand their training image back, which would flatter it."""
    import torch

    from training import config
    from training.engine.images import to_tensor
    from training.evaluation.metrics.memorisation import _flat, _to_u8

    params = config.load(project / "params.yaml")
    size = params.ingest.image_size
    gen = _flat(to_tensor(_to_u8(samples, size)))
    own = _flat(to_tensor(_to_u8(recons, size)))
    d = (gen - own).pow(2).mean(1).sqrt()
    return int((d < params.evaluate.copy_distance).sum()), float(torch.median(d))


def sampler_arg(v: str) -> tuple[str, int]:
    """``NAME:STEPS`` (e.g. ``ddpm:100``) as (scheduler, steps), checked at parse time,
    before any image is read."""
    from typing import get_args

    from training.sections import SchedulerName

    name, _, steps = v.partition(":")
    if name not in get_args(SchedulerName) or not steps.isdigit() or int(steps) < 1:
        raise argparse.ArgumentTypeError(
            f"{v!r}: give NAME:STEPS, NAME one of {', '.join(get_args(SchedulerName))}"
        )
    return name, int(steps)


def main() -> None:
    import statistics

    import numpy as np

    from training.evaluation.metrics.clip_score import clip_scores
    from training.evaluation.metrics.distribution import (
        clip_image_embeddings,
        cmmd,
        frechet_distance,
    )

    ap = argparse.ArgumentParser()
    ap.add_argument("projects", type=Path, nargs="+")
    ap.add_argument("--guidance", type=lambda v: [float(g) for g in v.split(",") if g],
                    default=[1.5, 2.0], help="comma-separated; '' for none")  # fmt: skip
    ap.add_argument(
        "--draws",
        type=int,
        default=5,
        help="val-caption sample sets (seeds apart); 0: the pooled rows only",
    )
    ap.add_argument(
        "--sampler",
        type=sampler_arg,
        metavar="NAME:STEPS",
        help="e.g. ddpm:100; default: the pipeline's own (dpm++, 20 steps)",
    )
    ap.add_argument(
        "--guidance-start",
        type=float,
        default=0.0,
        metavar="F",
        help="the noisiest fraction of the steps sampled unguided (default 0: every step)",
    )
    ap.add_argument("--ref", type=int, default=1024)
    ap.add_argument("--pool", type=int, default=640, help="train captions drawn once each")
    ap.add_argument("--vae", nargs="?", const="run", metavar="DIR",
                    help="also the pooled images reconstructed by the run's VAE, or by the "
                         "VAE in DIR (another of the same image size)")  # fmt: skip
    args = ap.parse_args()
    if args.draws < 0 or args.pool < 2:
        ap.error("--draws must be at least 0 and --pool at least 2")
    if not 0 <= args.guidance_start < 1:
        ap.error("--guidance-start must be a fraction in [0, 1)")
    tag = f"-{args.sampler[0]}{args.sampler[1]}" if args.sampler else ""
    if args.guidance_start:
        tag += f"-from{args.guidance_start:g}"
    # CLIP score (real): the real images' with the same captions; for training captions
    # that is the CLIP's own training pairs, so it reads high
    print("| project | captions | images | n vs ref | fd_clip | floor | fd / floor | cmmd_clip "
          "| cmmd floor | CLIP score (real) | own-image copies (median RMS) |\n"
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip

    def shown(q: dict) -> dict:  # a pooled() result as the table prints it
        return {**q, "fd_clip": f"{q['fd_clip']:.3f}", "fd_ratio": f"**{q['fd_ratio']:.2f}**",
                "cmmd_clip": f"{q['cmmd_clip']:.3f}"}  # fmt: skip

    def row(project, captions, images, n, q, score="", copies="") -> None:
        print(f"| {project} | {captions} | {images} | {n} | {q['fd_clip']} | {q['fd_floor']:.3f} "
              f"| {q['fd_ratio']} | {q['cmmd_clip']} | {q['cmmd_floor']:.3f} | {score} "
              f"| {copies} |", flush=True)  # fmt: skip

    for project in args.projects:
        clip = project / "data/models/clip"
        cache = project.parent / "pooled-samples" / project.name
        ref, pool, pool_caps = train_pool(project, args.ref, args.pool)
        ref_e, floor_e = clip_image_embeddings(clip, ref), clip_image_embeddings(clip, pool)
        real_score = float(clip_scores(clip, pool_caps, pool).mean())
        # the val captions, each with its own val image (the split is by URL, so a caption
        # may also be a training one; on Twemoji none is): few captions, so each draw is
        # measured on its own against the val images of the same captions (--draws 0: none)
        if args.draws:
            val, val_caps = real_images(project)
            own = first_per_caption(val, val_caps)
            prompts = list(own)
            val_e = clip_image_embeddings(clip, [own[p] for p in prompts])
            val_fd, val_cmmd = frechet_distance(val_e, ref_e), cmmd(val_e, ref_e)
            real_val = float(clip_scores(clip, prompts, [own[p] for p in prompts]).mean())
        recons = reconstruct(project / "data/models/vae", pool)
        n_pool = f"{len(pool)} vs {len(ref)}"
        if args.vae:  # the pooled images through the run's VAE, in place of samples
            other = args.vae != "run"
            images = reconstruct(Path(args.vae), pool) if other else recons
            q = shown(pooled(clip_image_embeddings(clip, images), ref_e, floor_e))
            row(project, "train", f"reconstructions by {args.vae if other else 'its VAE'}",
                n_pool, q)  # fmt: skip
        for g in args.guidance:
            samples = draw(
                project,
                pool_caps,
                0,
                g,
                cache / f"train-g{g:g}{tag}",
                args.sampler,
                args.guidance_start,
            )
            q = shown(pooled(clip_image_embeddings(clip, samples), ref_e, floor_e))
            k, d = own_copies(project, samples, recons)
            score = float(clip_scores(clip, pool_caps, samples).mean())
            row(project, "train", f"samples at {g:g}{tag}", n_pool, q,
                f"{score:.3f} ({real_score:.3f})", f"{k} ({d:.3f})")  # fmt: skip
            if not args.draws:
                continue
            sets = [
                draw(
                    project,
                    prompts,
                    i * len(prompts),
                    g,
                    cache / f"g{g:g}{tag}-{i}",
                    args.sampler,
                    args.guidance_start,
                )
                for i in range(args.draws)
            ]
            embs = [clip_image_embeddings(clip, s) for s in sets]
            fds = [frechet_distance(e, ref_e) for e in embs]
            cms = [cmmd(e, ref_e) for e in embs]
            ratios = [f / val_fd for f in fds]
            sd = statistics.stdev if len(fds) > 1 else (lambda v: 0.0)
            q = {
                "fd_clip": f"{statistics.mean(fds):.3f} ± {sd(fds):.3f}",
                "fd_floor": val_fd,
                "fd_ratio": f"**{statistics.mean(ratios):.2f}** ± {sd(ratios):.2f}",
                "cmmd_clip": f"{statistics.mean(cms):.3f} ± {sd(cms):.3f}",
                "cmmd_floor": val_cmmd,
            }
            score = float(np.mean([clip_scores(clip, prompts, s).mean() for s in sets]))
            row(project, "val", f"samples at {g:g}, per draw", f"{len(prompts)} vs {len(ref)}",
                q, f"{score:.3f} ({real_val:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
