"""Small real splits for the loader tests: webdataset tars of random images, written
by the same ``ShardWriter`` validate uses (so each has its ``index.json``)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.engine.images import caption, decode_image
from training.intake import shards

SIZE = 8


def png(rng: np.random.Generator, size: int = SIZE) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def image_split(
    directory: Path,
    n: int = 200,
    per_shard: int = 37,
    seed: int = 0,
    size: int = SIZE,
    prefix: str = "train",
) -> Path:
    rng = np.random.default_rng(seed)
    with shards.ShardWriter(directory, prefix, per_shard) as w:
        for i in range(n):
            caption = f"a {('red', 'green', 'blue')[i % 3]} thing number {i}"
            w.write(shards.Record(f"{i:06d}", png(rng, size), "png", caption, {}))
    return directory


def decode(sample: dict) -> tuple[np.ndarray, str]:
    return decode_image(sample, SIZE), caption(sample)


def collate(samples: list) -> dict[str, np.ndarray]:
    return {
        "x": np.stack([x for x, _ in samples]),
        "n": np.array([int(c.split()[-1]) for _, c in samples]),  # which sample it is
    }


def shapes_split(
    directory: Path, n: int, size: int, per_shard: int = 1000, seed: int = 0, prefix: str = "train"
) -> Path:
    """A clean split of the built-in shapes at ``size`` px, as validate writes it."""
    from training.intake import builtin

    with shards.ShardWriter(directory, prefix, per_shard) as w:
        for i, s in enumerate(builtin.shapes(n, size, seed)):
            buf = io.BytesIO()
            s.image.save(buf, format="PNG", compress_level=1)
            w.write(shards.Record(f"{i:07d}", buf.getvalue(), "png", s.caption, {}))
    return directory


def latents_dir(
    root: Path,
    n: int,
    latent: tuple[int, int, int] = (4, 8, 8),
    text: tuple[int, int] = (24, 64),
    per_shard: int = 2000,
    seed: int = 0,
    n_val: int = 64,
    pooled: int | None = None,
) -> Path:
    """A latents directory laid out as precompute_latents writes it (random values):
    ``train/`` and ``val/`` shards with their indexes, the manifest and the two text-state
    files. ``pooled``: also a pooled text vector of that width per sample (the DiT's)."""
    from safetensors.torch import save_file

    from training.disk import write_json
    from training.intake.index import write_index

    g = torch.Generator().manual_seed(seed)
    extra = {"pooled": (pooled,)} if pooled else {}
    for split, count in (("train", n), ("val", n_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        counts = {}
        for k, lo in enumerate(range(0, count, per_shard)):
            m, name = min(per_shard, count - lo), f"{split}-{k:05d}-000.safetensors"
            save_file(
                {
                    "mean": torch.randn((m, *latent), generator=g),
                    "std": torch.rand((m, *latent), generator=g) * 0.1 + 0.05,
                    "text": torch.randn((m, *text), generator=g).half(),
                    **{k: torch.randn((m, *v), generator=g).half() for k, v in extra.items()},
                },
                root / split / name,
            )
            counts[name] = m
        write_index(root / split, counts, split)
    save_file(
        {"text": torch.zeros((1, *text)), **{k: torch.zeros((1, *v)) for k, v in extra.items()}},
        root / "null_text.safetensors",
    )
    save_file({"text": torch.randn((2, *text), generator=g)}, root / "preview_text.safetensors")
    write_json(
        root / "manifest.json",
        {
            "vae": {"scaling_factor": 1.0},
            "splits": {"train": {"count": n}, "val": {"count": n_val}},
            "tensors": {
                "mean": {"shape": list(latent), "dtype": "torch.float32"},
                "std": {"shape": list(latent), "dtype": "torch.float32"},
                "text": {"shape": list(text), "dtype": "torch.float16"},
                **{k: {"shape": list(v), "dtype": "torch.float16"} for k, v in extra.items()},
            },
            "preview_prompts": ["one", "two"],
        },
    )
    return root


# One training stage in its own process, on the splits under ``root`` (``clean/``,
# ``latents/`` and a ``vae/`` for the U-Net's previews), printing its peak RSS last.
STAGE_CALLS = {
    "vae": "vae.run(params, root / 'clean', root / 'out-vae', root / 'ck-vae')",
    "clip": "clip.run(params, root / 'clean', root / 'out-clip', root / 'ck-clip')",
    "unet": "unet.run(params, root / 'latents', root / 'vae', root / 'out-unet', root / 'ck-unet')",
}


def stage_process(root: Path, body: str, params: dict, preexec=None, timeout: float = 1800):
    """Run ``body`` (e.g. ``STAGE_CALLS["vae"]``) in a fresh Python with ``params``
    (a raw params mapping) resolved as ``params`` and ``root`` set."""
    import json
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        f"""
        import json, resource, shutil
        from pathlib import Path
        from training.config import resolve
        from training.phases import clip, unet, vae
        params = resolve(json.loads({json.dumps(json.dumps(params))}))
        root = Path({str(root)!r})
        for d in root.glob("ck-*"):
            shutil.rmtree(d)
        """
    )
    code += (
        body + "\nprint('peak_rss_mb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec,
        env={**os.environ, "KILN_CACHE_DIR": str(root / "cache")},
    )


def peak_rss_mib(proc) -> float:
    return float(proc.stdout.split("peak_rss_mb")[-1])
