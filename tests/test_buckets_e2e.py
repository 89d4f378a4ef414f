"""End to end with aspect-ratio buckets (issue #15): a folder of wide, tall and square
pictures at 64 px, through the whole pipeline (`kiln run`, few steps), then `kiln
generate --width --height`. Checks that each image kept its shape in the bucket nearest
it, that every stage trained on them, and that a wide picture can be drawn; quality is
not measured here."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from training import config
from training.intake import shards

from .conftest import copy_project, kiln

pytestmark = pytest.mark.e2e
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}
CANVASES = {"wide": (192, 96), "tall": (96, 192), "square": (128, 128), "wider": (170, 100)}
SHORT = {
    "ingest.image_size": 64,  # tiny's widths at 64 px: 64x64, 80x48, 48x80, 96x48, 48x96
    "validate.val_fraction": 0.15,
    "validate.near_duplicates": "off",
    "train_vae.steps": 40,
    "train_vae.batch_size": 8,
    "train_clip.steps": 40,
    "train_clip.batch_size": 32,
    "train_unet.steps": 40,
    "train_unet.batch_size": 8,
    "train_unet.preview_every": 0,
    "evaluate.max_prompts": 4,
    "evaluate.samples_per_prompt": 1,
    "evaluate.sweep_prompts": 0,
}


def picture_folder(dest: Path, per_kind: int = 45) -> Path:
    """Ellipses and boxes in three colours on four canvas shapes, captioned."""
    dest.mkdir(parents=True)
    k = 0
    for kind, (w, h) in CANVASES.items():
        for i in range(per_kind):
            colour = list(COLOURS)[i % 3]
            shape = ("ellipse", "box")[(i // 3) % 2]
            img = Image.new("RGB", (w, h), (250, 250, 250))
            box = (w // 6 + i % 7, h // 6 + i % 5, w - w // 6 - i % 4, h - h // 6 - i % 6)
            draw = ImageDraw.Draw(img)
            (draw.ellipse if shape == "ellipse" else draw.rectangle)(box, fill=COLOURS[colour])
            img.save(dest / f"{k:04d}.png")
            (dest / f"{k:04d}.txt").write_text(f"a {colour} {shape} on a {kind} canvas")
            k += 1
    return dest


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("buckets")
    folder = picture_folder(root / "pictures")
    project = copy_project(root / "kiln")
    config.set_values(project / "params.yaml", SHORT)
    proc = kiln(project, "run", "--dataset", "folder", "--source", str(folder), timeout=3000)
    return project, proc


def test_each_picture_keeps_its_shape_in_its_bucket(run):
    project, proc = run
    clean = project / "data" / "clean"
    report = json.loads((project / "data" / "validation" / "report.json").read_text())
    train = report["buckets"]["train"]
    assert set(train) == {"64x64", "96x48", "48x96", "80x48"}, train
    assert "train images per aspect-ratio bucket: " in proc.stdout + proc.stderr
    index = json.loads((clean / "train" / "index.json").read_text())
    for entry in index["shardlist"]:  # every shard one bucket, and its images that size
        size = tuple(int(v) for v in entry["bucket"].split("x"))
        recs = list(shards.read([clean / "train" / entry["url"]]))
        assert {r.image().size for r in recs} == {size}
        kinds = {r.caption.rsplit(" ", 2)[1] for r in recs}
        want = {"64x64": {"square"}, "96x48": {"wide"}, "48x96": {"tall"}, "80x48": {"wider"}}
        assert kinds == want[entry["bucket"]]


def test_every_stage_trained_on_the_buckets(run):
    project, proc = run
    assert "are never drawn" not in proc.stdout + proc.stderr  # every bucket fills a batch
    manifest = json.loads((project / "data" / "latents" / "manifest.json").read_text())
    assert set(manifest["splits"]["train"]["buckets"]) == {"64x64", "96x48", "48x96", "80x48"}
    assert manifest["tensors"]["mean"]["shape"] == [4, 16, 16]  # the square's: sample size
    metrics = {
        s: json.loads((project / "data" / "metrics" / f"{s}.json").read_text())
        for s in ("train_vae", "train_clip", "train_unet", "evaluate")
    }
    assert metrics["train_vae"]["val_psnr"] > 10
    assert metrics["train_unet"]["val_loss"] > 0 and metrics["train_clip"]["val_i2t_r1"] > 0
    assert metrics["evaluate"]["vae_psnr"] > 10


def test_a_wide_picture_is_drawn_at_a_wide_bucket(run, tmp_path):
    project, _ = run
    out = tmp_path / "wide"
    kiln(project, "generate", "a red ellipse on a wide canvas", "--width", "96",
         "--height", "48", "--steps", "4", "--out", str(out))  # fmt: skip
    (png,) = out.glob("*.png")
    assert Image.open(png).size == (96, 48)
