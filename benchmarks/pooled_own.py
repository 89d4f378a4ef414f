"""Trained projects' samples against their training images, pooled, each in its own CLIP.

Usage (from the repository root, alone on the machine, on projects that ran ``kiln run``):
    .venv/bin/python benchmarks/pooled_own.py PROJECT [PROJECT ...] [--guidance 1.5,2]
        [--draws 5] [--ref 1024] [--vae]

``benchmarks/common_space.py``'s pooled measurement (all draws of every distinct val
caption against ``--ref`` seeded-random training images; the floor: as many other
training images against the same reference) for runs that need no common ruler: each
project is measured with the CLIP it trained, and read as the ratio to its own floor.
So runs of different profiles (tiny at 32 px, tiny64 at 64 px, whose CLIPs cannot embed
each other's pictures) are set side by side. Samples are kept under
``PROJECT/../pooled-samples/<project's name>``, reused only for the same weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common_space import draw, pooled, real_images  # noqa: E402


def reconstruct(project: Path, images: list) -> list:
    """``images`` encoded (posterior means) and decoded by the run's VAE: what a perfect
    denoiser's samples could at best look like, so their distance to the reference is
    the part of the samples' distance the VAE alone accounts for (LDM's reconstruction
    FID)."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    from training.engine.images import to_tensor, to_uint8

    vae = AutoencoderKL.from_pretrained(project / "data/models/vae").eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 128):
            x = to_tensor(np.stack([np.asarray(im.convert("RGB")) for im in images[i : i + 128]]))
            recon = vae(x, sample_posterior=False).sample
            out += [Image.fromarray(a) for a in to_uint8(recon)]
    return out


def main() -> None:
    import numpy as np

    from training.evaluation.metrics.clip_score import clip_scores
    from training.evaluation.metrics.distribution import clip_image_embeddings

    ap = argparse.ArgumentParser()
    ap.add_argument("projects", type=Path, nargs="+")
    ap.add_argument("--guidance", type=lambda v: [float(g) for g in v.split(",")],
                    default=[1.5, 2.0])  # fmt: skip
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--ref", type=int, default=1024)
    ap.add_argument("--vae", action="store_true",
                    help="also the floor's images reconstructed by the run's VAE")  # fmt: skip
    args = ap.parse_args()
    print("| project | guidance | samples | fd_clip | floor | fd / floor | cmmd_clip | cmmd floor "
          "| CLIP score (real) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    for project in args.projects:
        clip = project / "data/models/clip"
        real, real_caps = real_images(project)
        prompts = list(dict.fromkeys(real_caps))
        n_pool = args.draws * len(prompts)
        train_imgs, _ = real_images(project, "train", 10**9)
        order = np.random.default_rng(0).permutation(len(train_imgs))
        if len(train_imgs) < args.ref + n_pool:
            sys.exit(f"{project}: {len(train_imgs)} train images, --ref + pooled needs more")
        ref_e = clip_image_embeddings(clip, [train_imgs[i] for i in order[: args.ref]])
        floor_imgs = [train_imgs[i] for i in order[args.ref : args.ref + n_pool]]
        floor_e = clip_image_embeddings(clip, floor_imgs)
        real_clip = float(clip_scores(clip, real_caps, real).mean())
        if args.vae:  # the floor's images through the run's VAE, in place of samples
            q = pooled(clip_image_embeddings(clip, reconstruct(project, floor_imgs)), ref_e,
                       floor_e)  # fmt: skip
            print(
                f"| {project} | VAE recon | {q['n']} vs {q['ref']} | {q['fd_clip']:.3f} | "
                f"{q['fd_floor']:.3f} | {q['fd_ratio']:.2f} | {q['cmmd_clip']:.3f} | "
                f"{q['cmmd_floor']:.3f} | |",
                flush=True,
            )
        for g in args.guidance:
            cache = project.parent / "pooled-samples" / project.name
            sets = [
                draw(project, prompts, k * len(prompts), g, cache / f"g{g:g}-{k}")
                for k in range(args.draws)
            ]
            q = pooled(np.concatenate([clip_image_embeddings(clip, s) for s in sets]), ref_e,
                       floor_e)  # fmt: skip
            score = float(np.mean([clip_scores(clip, prompts, s).mean() for s in sets]))
            print(
                f"| {project} | {g:g} | {q['n']} vs {q['ref']} | {q['fd_clip']:.3f} | "
                f"{q['fd_floor']:.3f} | {q['fd_ratio']:.2f} | {q['cmmd_clip']:.3f} | "
                f"{q['cmmd_floor']:.3f} | {score:.3f} ({real_clip:.3f}) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
