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
    import json

    from diffusers import AutoencoderKL
    from PIL import Image

    from training.engine import loaders
    from training.engine.images import psnr, ssim, to_tensor, to_uint8

    dev = E.device()
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().to(dev)
    records = loaders.records(str(clean_dir / "val"), limit)  # every bucket in proportion
    by_size: dict[tuple[int, int], list[int]] = {}  # a bucketed split: one pass per shape
    for i, r in enumerate(records):
        by_size.setdefault(r.image().size, []).append(i)
    psnrs, ssim_sum = [], 0.0
    real_u8: list = [None] * len(records)
    rec_u8: list = [None] * len(records)
    for idx in by_size.values():
        x = to_tensor(np.stack([np.asarray(records[i].image(), dtype=np.uint8) for i in idx]))
        rec = torch.cat(
            [vae(b.to(dev), sample_posterior=False).sample.clamp(-1, 1).cpu() for b in x.split(128)]
        )
        psnrs.append(psnr(rec, x))
        ssim_sum += ssim(rec, x) * len(idx)
        for k, i in enumerate(idx):
            real_u8[i], rec_u8[i] = to_uint8(x[k : k + 1])[0], to_uint8(rec[k : k + 1])[0]
    out = {
        "vae_psnr": float(np.mean(np.concatenate(psnrs))),
        "vae_ssim": float(ssim_sum / len(records)),
    }
    if oracle is None:
        return out
    # Built-in samples carry their ground truth through img2dataset as the `meta` column.
    truths = [json.loads(r.meta.get("meta") or "{}") for r in records]
    for name, images in (("real", real_u8), ("vae_recon", rec_u8)):
        hits = [
            oracle.score(Image.fromarray(u8), t)["all"]
            for u8, t in zip(images, truths, strict=True)
            if t
        ]
        if hits:
            out[f"ceiling_acc_all_{name}"] = float(np.mean(hits))
    return out


def score(s: Samples) -> dict[str, float]:
    return reconstruction_scores(s.vae_dir, s.clean_dir, s.oracle)
