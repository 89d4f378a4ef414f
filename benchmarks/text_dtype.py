"""What storing text states in 16 bits costs: precision, and the U-Net's loss.

Usage (after `make run`, from the repository root):
    .venv/bin/python benchmarks/text_dtype.py [--batches 20]

Encodes the validation captions with the pipeline's CLIP text encoder in float32, rounds
the states to float16 and back, and reports the rounding error. Then it scores the
pipeline's trained U-Net (EMA weights) on ``--batches`` validation batches, each with
seeded noise and timesteps, once with the float32 states and once with the rounded ones:
the difference in the denoising loss against the loss's own spread between batches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from training import paths as P  # noqa: E402
from training.config import load  # noqa: E402
from training.engine.images import caption, decode_image, to_tensor  # noqa: E402
from training.engine.loaders import Split  # noqa: E402
from training.inference.text import load_text_encoder, text_states  # noqa: E402
from training.phases import unet as U  # noqa: E402


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=20)
    args = ap.parse_args()
    params = load()
    size = params.ingest.image_size
    tokenizer, encoder = load_text_encoder(P.CLIP)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(P.VAE).eval()
    model = UNet2DConditionModel.from_pretrained(P.UNET).eval()
    sched = U.noise_scheduler(params)
    c = params.train_unet
    val = Split(str(P.CLEAN / "val"), lambda s: (decode_image(s, size), caption(s)), list)
    errs, rels, l32, l16 = [], [], [], []
    for k, batch in enumerate(val.scan(64)):
        if k == args.batches:
            break
        px = to_tensor(np.stack([p for p, _ in batch]))
        t32 = text_states(tokenizer, encoder, [t for _, t in batch])
        t16 = t32.half().float()
        errs.append(float((t16 - t32).abs().max()))
        rels.append(float(((t16 - t32).norm(dim=-1) / t32.norm(dim=-1)).max()))
        z0 = vae.encode(px).latent_dist.mean * vae.config.scaling_factor
        g = torch.Generator().manual_seed(k)
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, c.num_train_timesteps, (len(z0),), generator=g)
        zt = sched.add_noise(z0, noise, t)
        target = sched.get_velocity(z0, noise, t) if c.prediction_type != "epsilon" else noise
        for text, out in ((t32, l32), (t16, l16)):
            pred = model(zt, t, encoder_hidden_states=text).sample
            out.append(float(torch.nn.functional.mse_loss(pred, target)))
    val.close()
    a, b = np.array(l32), np.array(l16)
    print(
        "| batches | max abs error | max relative error per token | loss fp32 | loss fp16 "
        "| mean abs loss difference | loss spread between batches (std) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {len(a)} | {max(errs):.2e} | {max(rels):.2e} | {a.mean():.5f} | {b.mean():.5f} "
        f"| {np.abs(a - b).mean():.2e} | {a.std():.2e} |"
    )


if __name__ == "__main__":
    main()
