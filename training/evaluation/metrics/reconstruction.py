"""VAE reconstruction: PSNR on held-out images, and the oracle's ceilings for the samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from training import engine as E
from training.evaluation.metrics.base import Samples


@torch.no_grad()
def reconstruction_scores(
    vae_dir: Path, clean_dir: Path, oracle, limit: int = 512
) -> dict[str, float]:
    """VAE reconstruction PSNR and SSIM on held-out images and, for the built-in sets, the
    oracle's all-attributes accuracy on those real images and on their reconstructions.

    The two accuracies are ceilings for the samples: a generated image is decoded by the
    same VAE, so it cannot score better than the VAE's reconstructions of real images
    (an L1-trained VAE that greyed out red and green capped colour accuracy at ~0.7).
    """
    import itertools
    import json

    from diffusers import AutoencoderKL
    from PIL import Image

    from training.engine.images import psnr, ssim, to_tensor, to_uint8
    from training.intake import shards

    dev = E.device()
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().to(dev)
    records = list(itertools.islice(shards.read(shards.shard_paths(clean_dir / "val")), limit))
    x = to_tensor(np.stack([np.asarray(r.image(), dtype=np.uint8) for r in records]))
    rec = torch.cat(
        [vae(b.to(dev), sample_posterior=False).sample.clamp(-1, 1).cpu() for b in x.split(128)]
    )
    out = {"vae_psnr": float(np.mean(psnr(rec, x))), "vae_ssim": float(ssim(rec, x))}
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


def score(s: Samples) -> dict[str, float]:
    return reconstruction_scores(s.vae_dir, s.clean_dir, s.oracle)
