"""Write pictures [start, stop) of a synthetic folder collection for
``benchmarks/intake_scale.sh``: 48 px PNGs of a random 6 x 6 colour grid (distinct, so
validate keeps them; ``grey``: the same grids in greyscale, the case where the
near-duplicate index once compared every picture with every other), each with a varied
``.txt`` caption, in subfolders of 1,000.

    .venv/bin/python benchmarks/intake_gen.py OUT START STOP [grey]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

ADJ = "red green blue tall tiny old shiny dark bright striped wooden metal plastic soft round"
NOUN = "cat dog house tree car bird boat lamp chair cup flower robot kite bridge tower"
WHERE = [
    "on a table", "in a field", "at night", "under the sea", "near a river",
    "in the snow", "on the left", "in the city", "by the window", "on a hill",
]  # fmt: skip


def caption(rng: np.random.Generator, i: int) -> str:
    a, b = rng.choice(ADJ.split(), 2, replace=False)
    return f"a {a} {b} {rng.choice(NOUN.split())} {rng.choice(WHERE)}, photo {i}"


def main(out: str, start: int, stop: int, grey: bool = False) -> None:
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        d = Path(out) / f"{i // 1000:04d}"
        d.mkdir(parents=True, exist_ok=True)
        grid = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        if grey:
            grid = np.repeat(grid[..., :1], 3, axis=2)
        Image.fromarray(grid).resize((48, 48), Image.Resampling.NEAREST).save(d / f"{i:07d}.png")
        (d / f"{i:07d}.txt").write_text(caption(rng, i))


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5) or sys.argv[1] in ("-h", "--help"):
        sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:5] == ["grey"])
