"""Why the pooled floor must share the samples' captions (RESULTS.md "the pooled floor").

Usage (from the repository root, on a project that ran ``kiln run`` and whose val-caption
draws ``benchmarks/pooled_own.py`` has kept):
    .venv/bin/python benchmarks/floor_check.py PROJECT [--guidance 1.5] [--draws 5]

The old pooled measurement set ``--draws`` draws of the distinct val captions against
1,024 training images, with a floor of as many *other* training images. This prints, in
the run's own CLIP and against that old floor, the FD of sets that a fair floor would
put at or below the samples: the val images themselves (each ``--draws`` times, and
once), and as many random training images as there are val captions. If those read
several times the floor, the floor measured the number of captions, not the model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common_space import first_per_caption, real_images, train_pool  # noqa: E402


def main() -> None:
    import numpy as np
    from PIL import Image

    from training.evaluation.metrics.distribution import clip_image_embeddings, frechet_distance

    ap = argparse.ArgumentParser()
    ap.add_argument("project", type=Path)
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--draws", type=int, default=5)
    args = ap.parse_args()
    clip = args.project / "data/models/clip"
    val, caps = real_images(args.project)
    own = first_per_caption(val, caps)
    prompts = list(own)
    n = args.draws * len(prompts)
    ref, floor, _ = train_pool(args.project, 1024, n)  # the old floor: n other images
    ref_e, floor_e = clip_image_embeddings(clip, ref), clip_image_embeddings(clip, floor)
    val_e = clip_image_embeddings(clip, [own[p] for p in prompts])
    cache = args.project.parent / "pooled-samples" / args.project.name
    folders = [cache / f"g{args.guidance:g}-{k}" for k in range(args.draws)]
    if not all((f / "requests.json").is_file() for f in folders):
        sys.exit(f"no kept draws under {cache}: run benchmarks/pooled_own.py on it first")
    gen_e = np.concatenate([
        clip_image_embeddings(clip, [Image.open(f / f"{i:05d}.png").convert("RGB")
                                     for i in range(len(prompts))])
        for f in folders
    ])  # fmt: skip
    base = frechet_distance(floor_e, ref_e)
    print(f"| set | n | fd_clip | / old floor ({n} other training images: {base:.4f}) |")
    print("|---|---:|---:|---:|")
    sets = {
        f"samples, {args.draws} draws at {args.guidance:g}": gen_e,
        f"val images, each {args.draws} times": np.tile(val_e, (args.draws, 1)),
        "val images, once": val_e,
        f"{len(prompts)} random training images": floor_e[: len(prompts)],
    }
    for name, e in sets.items():
        fd = frechet_distance(e, ref_e)
        print(f"| {name} | {len(e)} | {fd:.4f} | {fd / base:.2f} |")


if __name__ == "__main__":
    main()
