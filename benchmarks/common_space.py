"""Two commits' real-data runs scored in one another's feature spaces (issue #15).

Usage (from the repository root, alone on the machine; ~40 minutes at tiny):
    .venv/bin/python benchmarks/common_space.py OLD_COMMIT [NEW_COMMIT] [--profile tiny]
        [--out DIR] [--draws 5] [--ruler-steps N] [--ruler-seed 1]

FD and CMMD in Kiln are measured in the image space of the CLIP each run trained, so a
run that trains a different CLIP moves the ruler as well as the samples: two runs'
``cmmd_clip`` cannot be compared. This trains both commits on the same collection
(Twemoji from npm, as ``benchmarks/real_data.py``), then has each run's pipeline draw
the same requests (the newer run's first distinct val captions, one seed each) and
embeds both sample sets, and the same real val images, with each run's CLIP and with a
fixed ruler (``kiln ruler``'s CLIP, trained here on the newer run's clean split with its
own seed: neither run's). Each row of the printout is one ruler; within a row, the two
sample sets are measured alike. ``--draws`` sample sets per run (seeds apart) give each
figure a spread.
Each commit's tree is taken with ``git archive``, so it runs with its own code. The
trained projects stay under ``OUT/work``; a second invocation with the same commits
reuses them and only draws and measures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
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


def trained(work: Path, name: str, commit: str, profile: str, log: Path) -> Path:
    """``commit``'s project under ``work/name``, trained on Twemoji (once: a project
    with a finished run, recorded in ``trained.json``, is reused as it is)."""
    project = work / name
    done = project / "trained.json"
    if done.is_file() and json.loads(done.read_text())["commit"] == commit:
        print(f"{name} ({commit}): trained before, reused", flush=True)
        return project
    import shutil

    shutil.rmtree(project, ignore_errors=True)
    checkout(commit, project)
    folder = work / "emoji"
    if not (folder / "LICENCE.txt").is_file():
        emoji_folder(folder)
    wall = train(project, folder, profile, log)
    done.write_text(json.dumps({"commit": commit, "kiln_run_s": round(wall)}))
    print(f"{name} ({commit}): kiln run {wall:.0f} s", flush=True)
    return project


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


def draw(project: Path, prompts: list[str], offset: int = 0) -> list:
    from training.inference.sampling import Request, generate, load

    pipe = load(project / "data/eval/pipeline")
    requests = [Request(prompt=p, seed=offset + i) for i, p in enumerate(prompts)]
    return generate(pipe, requests)


def ruler(project: Path, work: Path, steps: int | None, seed: int) -> Path:
    """A fixed ruler CLIP (``training/phases/ruler.py``, this checkout's code) trained on
    ``project``'s clean split, kept under ``work/ruler-<seed>-<steps>``."""
    from training.phases.ruler import train

    params = config.load(project / "params.yaml")
    steps = steps or 2 * params.train_clip.steps
    out = work / f"ruler-{seed}-{steps}"
    if (out / "model.safetensors").is_file():
        print(f"ruler: trained before ({out}), reused", flush=True)
        return out
    t0 = time.perf_counter()
    train(params, project / "data/clean", out, work / "ruler-ckpt", steps, seed)
    print(f"ruler: {steps} CLIP steps, seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def main() -> None:
    import statistics

    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new", nargs="?", default="HEAD")
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--out", type=Path, default=Path("/tmp/kiln-common-space"))
    ap.add_argument("--draws", type=int, default=5, help="sample sets per run (seeds apart)")
    ap.add_argument("--ruler-steps", type=int, help="default: twice the profile's CLIP steps")
    ap.add_argument("--ruler-seed", type=int, default=1)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = {  # full hashes: a project trained at an older HEAD is not this HEAD's
        k: subprocess.run(
            ["git", "rev-parse", "--short", c], cwd=REPO, capture_output=True, text=True,
            check=True,
        ).stdout.strip()
        for k, c in (("old", args.old), ("new", args.new))
    }  # fmt: skip
    work = args.out / "work"  # kept: a second invocation reuses the trained projects
    projects = {}
    for name, commit in names.items():
        projects[name] = trained(work, name, commit, args.profile, args.out / f"{name}.log")
    rulers = {name: p / "data/models/clip" for name, p in projects.items()}
    rulers["fixed"] = ruler(projects["new"], work, args.ruler_steps, args.ruler_seed)

    from training.evaluation.metrics.distribution import (
        clip_image_embeddings,
        distribution_metrics,
    )

    real, captions = real_and_prompts(projects["new"])
    prompts = (captions * (len(real) // 2 // len(captions) + 1))[: len(real) // 2]
    samples = {
        name: [draw(p, prompts, k * len(prompts)) for k in range(args.draws)]
        for name, p in projects.items()
    }
    rows = []
    for r, clip in rulers.items():
        real_e = clip_image_embeddings(clip, real)
        for name, sets in samples.items():
            per_draw = [distribution_metrics(clip_image_embeddings(clip, s), real_e) for s in sets]
            row = {"clip": r, "samples": name, "draws": per_draw}
            for k in ("fd_clip", "fd_clip_real_halves", "fd_clip_ratio", "cmmd_clip",
                      "cmmd_clip_real_halves"):  # fmt: skip
                vals = [d[k] for d in per_draw]
                row[k] = statistics.mean(vals)
                row[f"{k}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            rows.append(row)
    (args.out / "common_space.json").write_text(json.dumps(rows, indent=1))
    label = {**names, "fixed": f"ruler, seed {args.ruler_seed}, {rulers['fixed'].name}"}
    print(
        f"{len(prompts)} requests x {args.draws} draws ({len(captions)} distinct val "
        f"captions), {len(real)} real val images; mean ± sd over the draws"
    )
    print("| CLIP (ruler) | samples of | fd_clip | floor | fd / floor | cmmd_clip | cmmd floor |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['clip']} ({label[r['clip']]}) | {r['samples']} ({names[r['samples']]}) | "
            f"{r['fd_clip']:.3f} ± {r['fd_clip_sd']:.3f} | {r['fd_clip_real_halves']:.3f} | "
            f"{r['fd_clip_ratio']:.2f} ± {r['fd_clip_ratio_sd']:.2f} | "
            f"{r['cmmd_clip']:.3f} ± {r['cmmd_clip_sd']:.3f} | {r['cmmd_clip_real_halves']:.3f} |"
        )


if __name__ == "__main__":
    main()
