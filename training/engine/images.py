"""Image tensors, quality metrics and grids — the small helpers every phase shares."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def to_tensor(u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` in [-1, 1] (diffusers' convention)."""
    return torch.as_tensor(u8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def decode_image(sample: dict, size: int | Collection[tuple[int, int]]) -> np.ndarray:
    """A shard sample's image as uint8 ``[H, W, 3]``, of ``size`` x ``size`` or one of
    the ``(width, height)`` sizes given (a split's aspect-ratio buckets); an error names
    what is wrong (the loaders skip such a sample and say why).

    OpenCV decodes (3x faster than Pillow on 32 px PNGs and without holding the GIL,
    which the training step's Python needs: the loaders decode on background threads);
    on Kiln's lossless PNG shards it gives Pillow's pixels exactly. Pillow reads what
    OpenCV cannot."""
    import cv2  # imported here: most commands never decode an image

    from training.intake.shards import IMAGE_EXTS

    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError(f"{sample.get('__key__')}: no image member")
    # RGB straight from the decoder: a BGR->RGB copy was a sixth of a sample's cost
    img = cv2.imdecode(np.frombuffer(sample[ext], np.uint8), cv2.IMREAD_COLOR_RGB)
    if img is None:
        import io

        pil = Image.open(io.BytesIO(sample[ext]))
        img = np.asarray(pil if pil.mode == "RGB" else pil.convert("RGB"), dtype=np.uint8)
    h, w = img.shape[:2]
    ok = (w, h) == (size, size) if isinstance(size, int) else (w, h) in size
    if not ok:
        sizes = [(size, size)] if isinstance(size, int) else sorted(size)
        want = " or ".join(f"{sw}x{sh}" for sw, sh in sizes)
        raise ValueError(f"{sample.get('__key__')}: image is {w}x{h}, expected {want}")
    return img


def center_square(img: np.ndarray, size: int) -> np.ndarray:
    """The centre square of an ``[H, W, 3]`` image, scaled to ``size`` (area averaging):
    how a bucketed image meets a square-only model (CLIP's vision tower, the metrics)."""
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    import cv2

    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = img[top : top + side, left : left + side]
    return np.ascontiguousarray(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA))


def square(img: Image.Image, size: int) -> Image.Image:
    """A PIL image's centre square at ``size`` (``center_square``): real images of a
    bucketed split beside square samples, in the metrics and the report."""
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return Image.fromarray(center_square(rgb, size))


def random_crops(
    x: torch.Tensor, side: int, step: int, g: torch.Generator, total: int = 0, first: int = 0
) -> torch.Tensor:
    """One ``side`` x ``side`` window of each image of ``[N, C, H, W]``, at offsets on a
    grid of ``step`` px (whole latent pixels: a crop's latents are the image's latents'
    crop) drawn from ``g`` for a batch of ``total`` (0: N), of which ``x`` is the part
    from ``first`` on (data parallel: the same crops at any process count). A side at
    least the image's keeps it whole."""
    n, _, h, w = x.shape
    sh, sw = min(side, h), min(side, w)
    if (sh, sw) == (h, w):
        return x
    total = total or n
    ys = torch.randint(0, (h - sh) // step + 1, (total,), generator=g)[first : first + n]
    xs = torch.randint(0, (w - sw) // step + 1, (total,), generator=g)[first : first + n]
    windows = zip((ys * step).tolist(), (xs * step).tolist(), strict=True)
    return torch.stack([x[i, :, y : y + sh, c : c + sw] for i, (y, c) in enumerate(windows)])


def caption(sample: dict) -> str:
    return sample.get("txt", b"").decode("utf-8", errors="replace")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float ``[N, 3, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, 3]``."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def psnr(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak range 2)."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(4.0 / mse)).numpy()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> float:
    """Mean SSIM (Wang et al. 2004) with a Gaussian window, on [0, 1]-scaled images."""
    a, b = (a + 1) / 2, (b + 1) / 2
    sigma = 1.5
    coords = torch.arange(window, dtype=torch.float32) - window // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum())[:, None] * (g / g.sum())[None, :]
    kernel = g.expand(a.shape[1], 1, window, window)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=x.shape[1])

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    s = num / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def grid(images: Sequence[Image.Image], nrow: int, scale: int = 1, pad: int = 2) -> Image.Image:
    """Tile PIL images row-major into one picture (nearest-neighbour upscaled)."""
    w, h = images[0].size
    w, h = w * scale, h * scale
    rows = (len(images) + nrow - 1) // nrow
    out = Image.new("RGB", (nrow * (w + pad) + pad, rows * (h + pad) + pad), (40, 40, 40))
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        out.paste(
            img.resize((w, h), Image.Resampling.NEAREST), (pad + c * (w + pad), pad + r * (h + pad))
        )
    return out


def save_grid(x: torch.Tensor, path: str | Path, nrow: int, scale: int = 2) -> Path:
    imgs = [Image.fromarray(a) for a in to_uint8(x)]
    path = Path(path)
    grid(imgs, nrow=nrow, scale=scale).save(path)
    return path
