"""Memorisation: does the model hand back copies of its training images?

Each generated sample's nearest training image is found in pixel space: RMS distance of
[0, 1] RGB values, at the training resolution or ``SEARCH_PX`` if smaller. Both sides go
through the VAE: a sample can only ever be the VAE decoder's rendering of an image, so
the training images are compared as the VAE reconstructs them, and a perfect copy is at
distance ~0 whatever the VAE's own error. A sample within ``evaluate.copy_distance`` of
one counts as a copy.

Real val images were never trained on, so the rate at which *their* reconstructions land
that close to a training image (near-duplicates across the split: skin-tone variants,
jittered renders) is what a model that does not memorise shows: read ``copies_frac``
against ``copies_frac_val``. The median nearest distances say the same without a
threshold: samples much closer to the training set than real val images are is
memorisation. Flagged samples are shown beside their training image in the report.

The search is exact and streams the training split in chunks; on a large split it
covers ``evaluate.copy_search_samples`` training images spread evenly over the split
(each aspect-ratio bucket and shard in proportion: ``Split.picked``) and says so
(``copy_search_note``).
"""

from __future__ import annotations

import numpy as np
import torch

from training.evaluation.metrics.base import Samples

SHOW = 16  # flagged pairs kept for the report's figure
SEARCH_PX = 32  # compared at most at this size: the cost is pixels x samples x images


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[n, 3, H, W] in [-1, 1] -> [n, D] in [0, 1] at most SEARCH_PX on a side."""
    import torch.nn.functional as F

    x = (x.float() + 1) / 2
    if x.shape[-1] > SEARCH_PX:
        x = F.interpolate(x, size=(SEARCH_PX, SEARCH_PX), mode="area")
    return x.flatten(1)


def _to_u8(images: list, size: int) -> np.ndarray:
    from PIL import Image

    return np.stack(
        [
            np.asarray(
                i.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
                if i.size != (size, size)
                else i.convert("RGB"),
                dtype=np.uint8,
            )
            for i in images
        ]
    )


def nearest(queries: torch.Tensor, chunks) -> tuple[torch.Tensor, torch.Tensor, int]:
    """RMS distance and index of each query's nearest reference row, over ``chunks``
    of ``[n, D]`` references, and how many references were searched."""
    best = torch.full((len(queries),), float("inf"))
    where = torch.zeros(len(queries), dtype=torch.long)
    seen = 0
    for ref in chunks:
        d = torch.cdist(queries, ref).div(queries.shape[1] ** 0.5)
        v, i = d.min(1)
        better = v < best
        best = torch.where(better, v, best)
        where = torch.where(better, i + seen, where)
        seen += len(ref)
    return best, where, seen


def copy_scores(
    samples: list, val: list, train, vae, size: int, threshold: float, limit: int
) -> dict:
    """The metrics of this module for PIL ``samples`` and ``val`` images against the
    ``train`` split (a ``loaders.Split`` of uint8 ``{"px"}``), through ``vae``."""
    from training.engine.images import to_tensor

    dev = next(vae.parameters()).device

    @torch.no_grad()
    def recon(u8: np.ndarray | torch.Tensor) -> torch.Tensor:
        out = []
        for b in to_tensor(u8).split(256):
            out.append(_flat(vae(b.to(dev), sample_posterior=False).sample.clamp(-1, 1).cpu()))
        return torch.cat(out)

    gen = _flat(to_tensor(_to_u8(samples, size)))
    queries = torch.cat([gen, recon(_to_u8(val, size))]) if val else gen
    read: list[np.ndarray] = []  # the ids searched: ``limit`` spread over the split

    def chunks():
        for ids in train.ranges(1024, limit):
            read.append(ids)
            yield recon(train.take(ids)["px"])

    dist, idx, searched = nearest(queries, chunks())
    n = len(samples)
    d_gen, d_val = dist[:n], dist[n:]
    copies = (d_gen < threshold).nonzero().flatten().tolist()
    flagged = sorted(copies, key=lambda i: float(d_gen[i]))[:SHOW]
    pairs = []
    if flagged:  # shown beside the training image itself, not its reconstruction
        train_px = train.take(np.concatenate(read)[idx[flagged].numpy()])["px"]
        pairs = [(i, train_px[k].numpy(), float(d_gen[i])) for k, i in enumerate(flagged)]
    out: dict = {
        "copies": len(copies),
        "copies_frac": len(copies) / max(1, n),
        "nn_train_dist_median": float(d_gen.median()),
        "copy_search_samples": searched,
        "memorisation_pairs": pairs,  # not a metric: the report's figure
    }
    if len(d_val):
        out["copies_frac_val"] = float((d_val < threshold).float().mean())
        out["nn_train_dist_median_val"] = float(d_val.median())
    else:
        out["copies_frac_val_skipped"] = "no val images to compare with"
    if searched < len(train):
        out["copy_search_note"] = (
            f"searched {searched} of {len(train)} training images, spread over the split"
        )
    return out


def score(s: Samples) -> dict:
    from diffusers import AutoencoderKL

    from training import engine as E
    from training.engine import loaders
    from training.engine.images import center_square, decode_image, square

    c = s.params.evaluate
    size, sizes = s.params.ingest.image_size, s.params.image_sizes()
    val_recs = loaders.records(str(s.clean_dir / "val"), 512)  # every bucket in proportion
    val = [square(r.image(), size) for r in val_recs]  # bucketed: compared as centre squares
    vae = AutoencoderKL.from_pretrained(s.vae_dir).eval().to(E.device())
    train = loaders.Split(
        str(s.clean_dir / "train"),
        lambda sample: center_square(decode_image(sample, sizes), size),
        lambda px: {"px": np.stack(px)},
    )
    try:
        return copy_scores(s.images, val, train, vae, size, c.copy_distance, c.copy_search_samples)
    finally:
        train.close()
