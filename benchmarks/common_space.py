"""Two commits' real-data runs scored in one another's feature spaces (issue #15).

Usage (from the repository root, alone on the machine; ~40 minutes at tiny):
    .venv/bin/python benchmarks/common_space.py OLD_COMMIT [NEW_COMMIT] [--profile tiny]
        [--out DIR]

FD and CMMD in Kiln are measured in the image space of the CLIP each run trained, so a
run that trains a different CLIP moves the ruler as well as the samples: two runs'
``cmmd_clip`` cannot be compared. This trains both commits on the same collection
(Twemoji from npm, as ``benchmarks/real_data.py``), then has each run's pipeline draw
the same requests (the newer run's first distinct val captions, one seed each) and
embeds both sample sets, and the same real val images, with each run's CLIP. Each row
of the printout is one ruler; within a row, the two sample sets are measured alike.
Each commit's tree is taken with ``git archive``, so it runs with its own code.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import REPO, kiln  # noqa: E402
from tests.realkit import emoji_folder  # noqa: E402
from training import config  # noqa: E402

N_REAL = 512  # real val images, as evaluate's distribution metrics take at most


def checkout(commit: str, dest: Path) -> Path:
    """``commit``'s tracked files in ``dest``, as a fresh one-commit repository (DVC and
    the run lock want a git work tree)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", commit], cwd=REPO, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", commit],
    ):
        subprocess.run(cmd, cwd=dest, check=True)
    return dest


def train(project: Path, folder: Path, profile: str, log: Path) -> float:
    t0 = time.perf_counter()
    proc = kiln(
        project, "run", "--dataset", "folder", "--source", str(folder), "--profile", profile,
        timeout=6 * 3600, check=False,
    )  # fmt: skip
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        sys.exit(f"kiln run in {project} failed ({proc.returncode}); log: {log}")
    return time.perf_counter() - t0


def real_and_prompts(project: Path) -> tuple[list, list[str]]:
    """The run's val images (centre squares, as evaluate scores them) and its distinct
    val captions in file order."""
    import itertools

    from training.engine.images import square
    from training.intake import shards

    params = config.load(project / "params.yaml")
    paths = shards.shard_paths(project / "data/clean/val")
    val = list(itertools.islice(shards.read(paths), N_REAL))
    size = params.ingest.image_size
    captions = list(dict.fromkeys(r.caption for r in val))
    return [square(r.image(), size) for r in val], captions


def draw(project: Path, prompts: list[str]) -> list:
    from training.inference.sampling import Request, generate, load

    pipe = load(project / "data/eval/pipeline")
    return generate(pipe, [Request(prompt=p, seed=i) for i, p in enumerate(prompts)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new", nargs="?", default="HEAD")
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--out", type=Path, default=Path("/tmp/kiln-common-space"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = {"old": args.old, "new": args.new}
    with tempfile.TemporaryDirectory() as tmp:
        folder = emoji_folder(Path(tmp) / "emoji")
        projects, walls = {}, {}
        for name, commit in names.items():
            projects[name] = checkout(commit, Path(tmp) / name)
            walls[name] = train(projects[name], folder, args.profile, args.out / f"{name}.log")
            print(f"{name} ({commit}): kiln run {walls[name]:.0f} s", flush=True)

        from training.evaluation.metrics.distribution import (
            clip_image_embeddings,
            distribution_metrics,
        )

        real, captions = real_and_prompts(projects["new"])
        prompts = (captions * (len(real) // 2 // len(captions) + 1))[: len(real) // 2]
        samples = {name: draw(p, prompts) for name, p in projects.items()}
        rows = []
        for ruler, p in projects.items():
            clip = p / "data/models/clip"
            real_e = clip_image_embeddings(clip, real)
            for name, images in samples.items():
                m = distribution_metrics(clip_image_embeddings(clip, images), real_e)
                rows.append({"clip": ruler, "samples": name, **m})
    (args.out / "common_space.json").write_text(json.dumps(rows, indent=1))
    print(
        f"{len(prompts)} requests ({len(captions)} distinct val captions), "
        f"{len(real)} real val images"
    )
    print("| CLIP (ruler) | samples of | fd_clip | floor | fd / floor | cmmd_clip | cmmd floor |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['clip']} ({names[r['clip']]}) | {r['samples']} ({names[r['samples']]}) | "
            f"{r['fd_clip']:.3f} | {r['fd_clip_real_halves']:.3f} | {r['fd_clip_ratio']:.2f} | "
            f"{r['cmmd_clip']:.3f} | {r['cmmd_clip_real_halves']:.3f} |"
        )


if __name__ == "__main__":
    main()
