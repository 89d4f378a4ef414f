"""Fréchet distance and CMMD in CLIP space: generated vs held-out real images, embedded by
Kiln's own CLIP image tower (no downloaded Inception or DINO weights): the run's, or the
fixed ruler ``evaluate.ruler`` names (``evaluation/ruler.py``).

FD is Heusel et al.'s formula on those embeddings; CMMD is Jayasumana et al.'s MMD with a
Gaussian kernel (sigma 10, result x 1000) on normalised CLIP embeddings, estimated without
bias (their code keeps the kernels' diagonals: about 0.18 where this reads 0.03 for two
draws of one distribution at m = 128; near 0, and at times below it, is the point). Both depend on
sample size, so the real set is split in halves and everything is compared at one size:
the distance between the two real halves says how low the metric can go."""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np
import torch

from training.evaluation.metrics.base import Samples
from training.evaluation.metrics.clip_score import load_clip


def halves(pictures: Sequence[Hashable]) -> tuple[list[int], list[int]]:
    """The real set's two halves, as indices: the reference half and the other half,
    which the floor compares with it and whose captions the samples are drawn for.
    Records of one picture (``pictures[i]``: its identity, e.g. a hash of its bytes)
    all go to one half, each picture to the half that has fewer records so far; with
    every picture distinct that is records 0, 2, 4... and 1, 3, 5... Was: those strides
    always, so under ``near_duplicates: image+caption`` a picture's adjacent captions
    put the same picture in both halves, a floor of copies, and a perfect generator
    read 4.9x it at three captions a picture, 9.7x at five."""
    where: dict[Hashable, int] = {}
    out: tuple[list[int], list[int]] = ([], [])
    for i, p in enumerate(pictures):
        if p not in where:
            where[p] = 0 if len(out[0]) <= len(out[1]) else 1
        out[where[p]].append(i)
    return out


def picture_ids(records: list) -> list[str]:
    """Each record's picture: the hash of its stored image bytes (one URL's or file's
    captions are stored with the same bytes)."""
    return [hashlib.sha256(r.image_bytes).hexdigest() for r in records]


def distribution_metrics(
    gen_e: np.ndarray, real_e: np.ndarray, pictures: Sequence[Hashable] | None = None
) -> dict:
    """fd_clip, cmmd_clip and their real-halves floors, or, when the sets are too small,
    ``<metric>_skipped`` reasons in their place (the report and the metrics JSON show
    them; MLflow gets numbers only). FD is biased by sample size, so the generated set
    and the other real half are compared with one real half at a common size ``m``.
    ``gen_e`` should be drawn like the other half (``halves(pictures)``, every record
    its own picture if not given): samples of its captions (``paired``)."""
    first, second = halves(range(len(real_e)) if pictures is None else pictures)
    ref, other = real_e[first], real_e[second]
    m = min(len(gen_e), len(ref), len(other))
    names = (
        "fd_clip",
        "cmmd_clip",
        "fd_clip_real_halves",
        "cmmd_clip_real_halves",
        "fd_clip_ratio",
    )
    if m < MIN_SAMPLES:
        why = (
            f"needs >= {MIN_SAMPLES} val images per half ({2 * MIN_SAMPLES} in all), have "
            f"{len(real_e)} val images and {len(gen_e)} samples; raise validate.val_fraction "
            "or add images"
        )
        return {f"{name}_skipped": why for name in names}
    out = {
        "fd_clip": frechet_distance(gen_e[:m], ref[:m]),
        "cmmd_clip": cmmd(gen_e[:m], ref[:m]),
        "fd_clip_real_halves": frechet_distance(other[:m], ref[:m]),
        "cmmd_clip_real_halves": cmmd(other[:m], ref[:m]),
        "fd_samples": m,
    }
    # The distance in units of the floor: comparable between runs that trained different
    # CLIPs (each run embeds with its own), which fd_clip alone is not. 1 = as close to
    # the val images as real images are. Two halves of (nearly) the same pictures give
    # a floor of rounding noise, which made the unit meaningless (was: a 1e-12 clamp, a
    # close and an unrelated generator both at ~1e11): skipped with the reason.
    spread = float(np.trace(np.atleast_2d(np.cov(ref[:m], rowvar=False))))
    floor = out["fd_clip_real_halves"]
    if floor > FLOOR_FRACTION * spread:
        out["fd_clip_ratio"] = out["fd_clip"] / floor
    else:
        out["fd_clip_ratio_skipped"] = (
            f"the two real halves are as good as identical (floor {floor:.3g}, the "
            f"images' own spread {spread:.3g}): duplicate or constant val images; "
            "fd_clip is still reported"
        )
    return out


@torch.no_grad()
def clip_image_embeddings(clip_dir: Path, images: list) -> np.ndarray:
    from training.engine.images import to_tensor
    from training.inference.text import embed

    model, _ = load_clip(Path(clip_dir))
    px = to_tensor(np.stack([np.asarray(i.convert("RGB")) for i in images]))
    return embed(model, pixels=px).numpy().astype(np.float64)


# Fewest embeddings per set FD and CMMD are defined for: a covariance (FD) and the
# unbiased MMD's m*(m-1) pairs (CMMD) need two; with one, sqrtm fails inside SciPy.
MIN_SAMPLES = 2
# A real-halves floor under this fraction of the embeddings' spread (the trace of their
# covariance) is no unit: identical halves read rounding noise (1e-7 of it and less),
# halves of distinct pictures far more (FD's small-sample bias alone)
FLOOR_FRACTION = 1e-4


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


def paired(prompts: list[str], want: list[str]) -> tuple[list[int], str]:
    """Which samples to compare: one for each caption of the other real half (``want``,
    the half the floor compares, ``halves``), in its order (a caption's
    k-th use takes its k-th sample), so the samples and that half are drawn for the same
    captions and differ only in being generated. Val shards keep the collection's order
    (often by category), so the first m samples would be of the first m captions, a few
    categories, set against a half that spans all of them: a distance that measures
    the choice, not the model. Where some caption has no sample (a built-in set's own
    prompt list, ``evaluate.max_prompts``), an even spread over all the samples.
    Returns the indices and ``"captions"`` or ``"spread"``."""
    free: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        free.setdefault(p, []).append(i)
    if all(len(free.get(c, ())) >= want.count(c) for c in set(want)):
        return [free[c].pop(0) for c in want], "captions"
    n = min(len(prompts), len(want))
    return sorted({round(x) for x in np.linspace(0, len(prompts) - 1, n)}), "spread"


# Real val images the distances read at most (evaluate's prompt order follows it)
LIMIT = 512


def score(s: Samples, limit: int = LIMIT) -> dict:
    from training.engine import loaders
    from training.engine.images import square

    # spread over the val split, each aspect-ratio bucket in proportion (the first
    # ``limit`` in shard order were the square bucket's only)
    val = loaders.records(str(s.clean_dir / "val"), limit)
    # a built-in set's held-out compositions are never in its val split: a sample of
    # one set against those images is charged for composing it right (was: a perfect
    # generator read 2.6x the floor, one drawing seen pairs instead 1.4x)
    held = [getattr(t, "held_out", False) for t in s.truths] or [False] * len(s.prompts)
    seen = [i for i, h in enumerate(held) if not h]
    pictures = picture_ids(val)
    other = halves(pictures)[1]
    at, how = paired([s.prompts[i] for i in seen], [val[i].caption for i in other])
    pick = [seen[i] for i in at]
    if len(pick) < MIN_SAMPLES or len(val) < 2 * MIN_SAMPLES:  # skipped, with the reason
        return distribution_metrics(np.empty((len(pick), 0)), np.empty((len(val), 0)))
    size = s.params.ingest.image_size  # bucketed images: their centre squares
    real = [square(r.image(), size) for r in val]
    ruler = s.ruler_dir or s.clip_dir  # a fixed ruler where one is set (evaluation/ruler.py)
    gen_e = clip_image_embeddings(ruler, [s.images[i] for i in pick])
    real_e = clip_image_embeddings(ruler, real)
    return {**distribution_metrics(gen_e, real_e, pictures), "fd_pairing": how}
