"""The built-in offline datasets, exactly as ``docs/DATASETS.md`` defines them.

Both are *rendered to files* and then go through the same ingestion path as web data
(served from a loopback HTTP server, fetched by img2dataset). The evaluation oracles in
``training/evaluation/oracle.py`` score generated images against these definitions, so the numbers
here (palette, sizes, cell centres, jitter) are the specification, not tuning knobs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# ---- shapes v1 -------------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "cross")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "white": (235, 235, 235),
}
COLOURS = tuple(PALETTE)
SIZES = ("small", "large")
SIZE_RANGE = {"small": (0.25, 0.35), "large": (0.50, 0.65)}
SIZE_THRESHOLD = 0.425  # bounding-box side / S separating small from large (midpoint)
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
CELL_CENTRES = (1 / 6, 1 / 2, 5 / 6)  # fractions of S, for rows and columns alike
JITTER = 0.03  # fraction of S
MARGIN = 0.02  # fraction of S
WHERE = {
    ("top", "left"): "in the top left",
    ("top", "center"): "at the top",
    ("top", "right"): "in the top right",
    ("middle", "left"): "on the left",
    ("middle", "center"): "in the center",
    ("middle", "right"): "on the right",
    ("bottom", "left"): "in the bottom left",
    ("bottom", "center"): "at the bottom",
    ("bottom", "right"): "in the bottom right",
}
HELD_OUT_PAIRS = frozenset(
    {("red", "triangle"), ("blue", "circle"), ("green", "cross"), ("yellow", "square")}
)
SUPERSAMPLE = 4

# ---- digits ----------------------------------------------------------------------------
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    size: str
    row: str
    col: str

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT_PAIRS

    def caption(self) -> str:
        """The canonical caption: ``a {size} {colour} {shape} {where}``."""
        return f"a {self.size} {self.colour} {self.shape} {WHERE[(self.row, self.col)]}"

    def attributes(self) -> dict[str, str]:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "row": self.row,
            "col": self.col,
        }


@dataclass(frozen=True)
class Sample:
    """One rendered sample: the image, its training caption and its ground truth."""

    image: Image.Image
    caption: str
    meta: dict[str, str]

    def meta_json(self) -> str:
        return json.dumps(self.meta, sort_keys=True)


def object_centre(side: float, cell: int, size: int, jitter: float) -> float:
    """Bounding-box centre on one axis (pixels): cell centre + jitter, kept inside."""
    lo = side / 2 + MARGIN * size
    hi = size - side / 2 - MARGIN * size
    return float(np.clip(CELL_CENTRES[cell] * size + jitter * size, lo, hi))


def render_shape(spec: ShapeSpec, size: int, side: float, cx: float, cy: float) -> Image.Image:
    """Draw one flat-coloured object on a black ``size``x``size`` canvas, anti-aliased."""
    k = SUPERSAMPLE
    canvas = Image.new("RGB", (size * k, size * k), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    colour = PALETTE[spec.colour]
    s, x, y = side * k, cx * k, cy * k
    left, top, right, bottom = x - s / 2, y - s / 2, x + s / 2, y + s / 2
    if spec.shape == "circle":
        draw.ellipse([left, top, right, bottom], fill=colour)
    elif spec.shape == "square":
        draw.rectangle([left, top, right, bottom], fill=colour)
    elif spec.shape == "triangle":  # isosceles, pointing up, base = height = side
        draw.polygon([(x, top), (right, bottom), (left, bottom)], fill=colour)
    elif spec.shape == "cross":  # plus sign, both bars = side, thickness = side / 3
        t = s / 3
        draw.rectangle([left, y - t / 2, right, y + t / 2], fill=colour)
        draw.rectangle([x - t / 2, top, x + t / 2, bottom], fill=colour)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}")
    return canvas.resize((size, size), Image.Resampling.BOX)


def shape_training_caption(spec: ShapeSpec, rng: np.random.Generator) -> str:
    """Canonical caption most of the time; otherwise a paraphrase or a partial caption
    (size and/or position omitted) so partial prompts work at sampling time."""
    where = WHERE[(spec.row, spec.col)]
    choices = (
        (0.55, spec.caption()),
        (0.15, f"a {spec.colour} {spec.shape} {where}"),
        (0.15, f"a {spec.size} {spec.colour} {spec.shape}"),
        (0.05, f"a {spec.colour} {spec.shape}"),
        (0.10, f"{where}, a {spec.size} {spec.colour} {spec.shape}"),
    )
    p = np.array([c[0] for c in choices])
    return choices[rng.choice(len(choices), p=p / p.sum())][1]


def all_shape_specs(include_held_out: bool) -> list[ShapeSpec]:
    specs = [
        ShapeSpec(shape, colour, sz, row, col)
        for shape in SHAPES
        for colour in COLOURS
        for sz in SIZES
        for row in ROWS
        for col in COLS
    ]
    return [s for s in specs if include_held_out or not s.held_out]


def random_shape(spec: ShapeSpec, size: int, rng: np.random.Generator) -> Image.Image:
    side = rng.uniform(*SIZE_RANGE[spec.size]) * size
    cx = object_centre(side, COLS.index(spec.col), size, rng.uniform(-JITTER, JITTER))
    cy = object_centre(side, ROWS.index(spec.row), size, rng.uniform(-JITTER, JITTER))
    return render_shape(spec, size, side, cx, cy)


def shapes(n: int, size: int, seed: int, include_held_out: bool = False) -> Iterator[Sample]:
    """``n`` shapes samples; compositions cycle through all (allowed) combinations so
    every one is covered evenly, in a seeded random order."""
    rng = np.random.default_rng(seed)
    specs = all_shape_specs(include_held_out)
    order: list[int] = []
    while len(order) < n:
        order.extend(rng.permutation(len(specs)).tolist())
    for i in order[:n]:
        spec = specs[i]
        yield Sample(
            random_shape(spec, size, rng), shape_training_caption(spec, rng), spec.attributes()
        )


def digit_image(values: np.ndarray, size: int) -> Image.Image:
    """sklearn's 8x8 digit (0..16) -> white-on-black RGB, bilinear upscale to ``size``."""
    grey = Image.fromarray(np.clip(values / 16.0 * 255.0, 0, 255).astype(np.uint8), mode="L")
    return grey.resize((size, size), Image.Resampling.BILINEAR).convert("RGB")


def digit_caption(label: int, rng: np.random.Generator) -> str:
    word = DIGIT_WORDS[label]
    choices = (
        (0.6, f"a handwritten digit {word}"),
        (0.15, f"the number {word}"),
        (0.15, f"handwritten {label}"),
        (0.1, f"a {word}"),
    )
    p = np.array([c[0] for c in choices])
    return choices[rng.choice(len(choices), p=p / p.sum())][1]


def digits(n: int, size: int, seed: int) -> Iterator[Sample]:
    """Up to ``n`` of scikit-learn's 1,797 real handwritten digits (shipped in the wheel)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(seed)
    for i in rng.permutation(len(data.target))[: min(n, len(data.target))]:
        label = int(data.target[i])
        yield Sample(
            digit_image(data.images[i], size), digit_caption(label, rng), {"digit": str(label)}
        )


def generate(
    dataset: str, n: int, size: int, seed: int, include_held_out: bool = False
) -> Iterator[Sample]:
    if dataset == "shapes":
        return shapes(n, size, seed, include_held_out)
    if dataset == "digits":
        return digits(n, size, seed)
    raise ValueError(f"unknown built-in dataset {dataset!r} (choose shapes or digits)")


# ---- evaluation prompts ----------------------------------------------------------------
@dataclass(frozen=True)
class EvalPrompt:
    prompt: str
    truth: dict[str, str]
    held_out: bool = False


def eval_prompts(dataset: str) -> list[EvalPrompt]:
    """The fixed evaluation prompt set, canonical captions only.

    shapes: every colour-shape pair (held-out ones included) at 6 size x position
    combinations chosen so that each pair sees both sizes and, across pairs, every
    position equally often: 144 prompts, 24 of them held-out compositions.
    digits: each digit's canonical caption, 5 times (different seeds per sample).
    """
    if dataset == "digits":
        return [
            EvalPrompt(f"a handwritten digit {DIGIT_WORDS[d]}", {"digit": str(d)})
            for _ in range(5)
            for d in range(10)
        ]
    if dataset != "shapes":
        raise ValueError(f"no built-in evaluation prompts for dataset {dataset!r}")
    cells = [(r, c) for r in ROWS for c in COLS]
    prompts = []
    for p, (colour, shape) in enumerate((c, s) for s in SHAPES for c in COLOURS):
        for j in range(6):
            row, col = cells[(p * 6 + j) % 9]
            spec = ShapeSpec(shape, colour, SIZES[j % 2], row, col)
            prompts.append(EvalPrompt(spec.caption(), spec.attributes(), spec.held_out))
    return prompts
