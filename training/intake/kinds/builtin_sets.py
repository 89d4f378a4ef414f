"""The built-in sets (shapes, digits): rendered offline, then served and fetched like any
folder of images, so they take exactly the path web data takes."""

from __future__ import annotations

import shutil
from pathlib import Path

from training.config import Params
from training.console import say
from training.intake.kinds.base import Prepared


def check(params: Params) -> None:
    pass  # nothing to find: the set is generated


def identity(params: Params) -> list:
    return []  # the params (seed, size, count) say it all


def render(params: Params, directory: Path) -> list[dict]:
    """Render the built-in dataset to ``directory``; returns rows (path, caption, meta)."""
    from training.intake import builtin

    c = params.ingest
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    samples = builtin.generate(
        c.dataset, c.num_samples, c.image_size, params.seed, c.include_held_out
    )
    for i, s in enumerate(samples):
        name = f"{i:07d}.png"
        s.image.save(directory / name)
        rows.append({"path": name, "caption": s.caption, "meta": s.meta_json()})
    return rows


def prepare(params: Params, work_dir: Path) -> Prepared:
    source = work_dir / "source"
    shutil.rmtree(source, ignore_errors=True)
    rows = render(params, source)
    # digits has 1,797 images in all: say how many there are, not how many asked
    c = params.ingest
    say(f"ingest: rendered {len(rows)} '{c.dataset}' samples at {c.image_size} px")
    return Prepared(folder=source, rows=rows, extra_cols=["meta"])
