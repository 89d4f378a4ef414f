"""Two commits' real-data runs scored in one another's feature spaces (issue #15).

Usage (from the repository root, alone on the machine; ~45 minutes at tiny):
    .venv/bin/python benchmarks/common_space.py OLD_COMMIT [NEW_COMMIT] [--profile tiny]
        [--out DIR] [--draws 5] [--ruler-steps N] [--ruler-seed 1] [--guidance 2]
        [--ref 1024] [--pool 640] [--extra PROJECT ...]

FD and CMMD in Kiln are measured in the image space of the CLIP each run trained, so a
run that trains a different CLIP moves the ruler as well as the samples: two runs'
``cmmd_clip`` cannot be compared. This trains both commits on the same collection
(Twemoji from npm, as ``benchmarks/real_data.py``), then has each run's pipeline draw
the same requests (every distinct val caption of the newer run, one seed each) and
embeds both sample sets, and the same real val images, with each run's CLIP and with a
fixed ruler (``kiln ruler``'s CLIP, trained here on the newer run's clean split with its
own seed: neither run's). Each row of the printout is one ruler; within a row, the two
sample sets are measured alike. ``--draws`` sample sets per run (seeds apart) give each
figure a spread; a second table draws once for each of ``--pool`` training captions and
measures those samples, and the captions' own images as the floor, against ``--ref``
other real training images, where the estimators' noise is several times smaller.
``--guidance 1,2,4`` draws at each scale (classifier-free guidance trades diversity for
fidelity, which is what these distances see).
Each commit's tree is taken with ``git archive``, so it runs with its own code. The
trained projects stay under ``OUT/work``, and the samples drawn under ``OUT/work/samples``;
a second invocation with the same commits reuses them and only measures what is new.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import REPO, kiln  # noqa: E402
from tests.realkit import emoji_folder  # noqa: E402
from training import config  # noqa: E402
from training.sections import SAMPLER  # noqa: E402

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


def real_images(project: Path, split: str = "val", n: int = N_REAL) -> tuple[list, list[str]]:
    """The run's first ``n`` images of ``split`` (centre squares, as evaluate scores them)
    and the caption of each."""
    import itertools

    from training.engine.images import square
    from training.intake import shards

    params = config.load(project / "params.yaml")
    paths = shards.shard_paths(project / "data/clean" / split)
    rows = list(itertools.islice(shards.read(paths), n))
    size = params.ingest.image_size
    return [square(r.image(), size) for r in rows], [r.caption for r in rows]


def first_per_caption(images: list, captions: list[str]) -> dict:
    """Each distinct caption's first image, in the captions' first-seen order."""
    own: dict = {}
    for image, caption in zip(images, captions, strict=True):
        own.setdefault(caption, image)
    return own


def train_pool(project: Path, n_ref: int, n_pool: int) -> tuple[list, list, list[str]]:
    """The pooled measurement's real images, from the train split in a seeded random
    order (shards keep the collection's order, by category): ``n_ref`` reference images,
    then ``n_pool`` others with their captions. The samples are drawn for those
    ``n_pool`` captions, one each, and the images themselves are the floor: sample and
    floor then have the same captions, as many, and so the same spread of subjects.
    (Samples of the few distinct val captions, several draws each, against as many
    *other* training images measured the narrower caption set as much as the model:
    the 122 val images themselves, each five times, scored 5.7x that floor at tiny;
    RESULTS.md "the pooled floor".)"""
    import numpy as np

    train_imgs, train_caps = real_images(project, "train", 10**9)
    if len(train_imgs) < n_ref + n_pool:
        sys.exit(f"{project}: {len(train_imgs)} train images, {n_ref} + {n_pool} needed")
    order = np.random.default_rng(0).permutation(len(train_imgs))
    pool = order[n_ref : n_ref + n_pool]
    return (
        [train_imgs[i] for i in order[:n_ref]],
        [train_imgs[i] for i in pool],
        [train_caps[i] for i in pool],
    )


def pooled(gen_e, ref_e, floor_e) -> dict:
    """Many samples at once against a large reference of real training images
    (``train_pool``): ``len(gen_e)`` samples, and the floor the real images of the same
    captions, against the same reference. The per-draw figures compare 61 samples with
    61 val images, where the unbiased CMMD's noise is as large as the gap being
    measured; hundreds of captions and a large reference shrink it several-fold."""
    from training.evaluation.metrics.distribution import cmmd, frechet_distance

    n = min(len(gen_e), len(floor_e))
    fd, fd_floor = frechet_distance(gen_e[:n], ref_e), frechet_distance(floor_e[:n], ref_e)
    return {
        "n": n,
        "ref": len(ref_e),
        "fd_clip": fd,
        "fd_floor": fd_floor,
        "fd_ratio": fd / fd_floor,
        "cmmd_clip": cmmd(gen_e[:n], ref_e),
        "cmmd_floor": cmmd(floor_e[:n], ref_e),
    }


def draw(
    project: Path,
    prompts: list[str],
    offset: int,
    guidance: float,
    cache: Path,
    sampler: tuple[str, int] | None = None,
    start: float = 0.0,
) -> list:
    """One sample per prompt, seeds ``offset``, ``offset + 1``...; kept as PNGs in
    ``cache`` (with the requests), so a second invocation measures without drawing.
    ``sampler``: (scheduler, steps) in place of the pipeline's default; ``start``: the
    guidance_start (the noisiest fraction of the steps unguided)."""
    from PIL import Image

    from training.inference.sampling import Request, generate, load, set_scheduler

    # samples are reused only for the same weights: a retrained project's, or a copy
    # retrained with other settings, are drawn again
    pipeline = project / "data/eval/pipeline"
    weights = hashlib.sha256()
    for f in sorted(pipeline.rglob("*.safetensors")):
        weights.update(f.read_bytes())
    key = {
        "prompts": prompts,
        "offset": offset,
        "guidance": guidance,
        "weights": weights.hexdigest(),
    }
    if sampler is not None:  # the default's key is unchanged, so its caches stay valid
        key["sampler"] = list(sampler)
    if start:
        key["guidance_start"] = start
    done = cache / "requests.json"
    if done.is_file() and json.loads(done.read_text()) == key:
        return [Image.open(cache / f"{i:05d}.png").convert("RGB") for i in range(len(prompts))]
    pipe = load(pipeline)
    steps = SAMPLER.steps
    if sampler is not None:
        set_scheduler(pipe, sampler[0])
        steps = sampler[1]
    requests = [
        Request(prompt=p, seed=offset + i, steps=steps, guidance=guidance, guidance_start=start)
        for i, p in enumerate(prompts)
    ]
    images = generate(pipe, requests)
    cache.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        im.save(cache / f"{i:05d}.png")
    done.write_text(json.dumps(key))
    return images


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
    ap.add_argument(
        "--guidance", type=lambda v: [float(g) for g in v.split(",")], default=[SAMPLER.guidance],
        help=f"comma-separated scales to draw at (evaluate's default: {SAMPLER.guidance:g})",
    )  # fmt: skip
    ap.add_argument("--ref", type=int, default=1024, help="train images in the pooled reference")
    ap.add_argument("--pool", type=int, default=640, help="train captions in the pooled table")
    ap.add_argument(
        "--extra", type=Path, action="append", default=[],
        help="a project trained on the same collection (a variant: other params), measured too",
    )  # fmt: skip
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
    for extra in args.extra:  # measured, not a ruler: its CLIP may be one of the above
        projects[extra.name] = extra
        names[extra.name] = str(extra)
    rulers["fixed"] = ruler(projects["new"], work, args.ruler_steps, args.ruler_seed)

    from training.evaluation.metrics.clip_score import clip_scores
    from training.evaluation.metrics.distribution import (
        clip_image_embeddings,
        distribution_metrics,
        paired,
    )

    real, real_caps = real_images(projects["new"])
    captions = list(dict.fromkeys(real_caps))
    prompts = captions  # every distinct val caption, as evaluate draws them
    pick, how = paired(prompts, real_caps)  # the other half's captions
    print(f"samples paired with the second real half by {how}", flush=True)
    # every run splits by URL, so the new run's train split is each run's
    ref_imgs, floor_imgs, floor_caps = train_pool(projects["new"], args.ref, args.pool)
    samples = {  # (run, guidance) -> draws
        (name, g): [
            draw(p, prompts, k * len(prompts), g, work / "samples" / f"{name}-g{g:g}-{k}")
            for k in range(args.draws)
        ]
        for name, p in projects.items()
        for g in args.guidance
    }
    pool_samples = {  # (run, guidance) -> one sample per pooled train caption
        (name, g): draw(p, floor_caps, 0, g, work / "samples" / f"{name}-train-g{g:g}")
        for name, p in projects.items()
        for g in args.guidance
    }
    rows = []
    for r, clip in rulers.items():
        real_e = clip_image_embeddings(clip, real)
        real_clip = float(clip_scores(clip, real_caps, real).mean())
        ref_e = clip_image_embeddings(clip, ref_imgs)
        floor_e = clip_image_embeddings(clip, floor_imgs)
        for (name, g), sets in samples.items():
            embs = [clip_image_embeddings(clip, s) for s in sets]
            per_draw = [distribution_metrics(e[pick], real_e) for e in embs]
            row = {"clip": r, "samples": name, "guidance": g, "draws": per_draw}
            for k in ("fd_clip", "fd_clip_real_halves", "fd_clip_ratio", "cmmd_clip",
                      "cmmd_clip_real_halves"):  # fmt: skip
                vals = [d[k] for d in per_draw]
                row[k] = statistics.mean(vals)
                row[f"{k}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            pool = pool_samples[(name, g)]
            row["pooled"] = pooled(clip_image_embeddings(clip, pool), ref_e, floor_e)
            # prompt fidelity, what lower guidance gives up: the ruler's CLIP score of
            # the pooled samples, beside the real val images' with their own captions (the
            # pooled captions' own images are the runs' CLIPs' training pairs: inflated)
            row["pooled"]["clip_score"] = float(clip_scores(clip, floor_caps, pool).mean())
            row["pooled"]["clip_score_real"] = real_clip
            rows.append(row)
    (args.out / "common_space.json").write_text(json.dumps(rows, indent=1))
    label = {**names, "fixed": f"ruler, seed {args.ruler_seed}, {rulers['fixed'].name}"}
    print(
        f"Per draw (as evaluate measures): of {len(prompts)} requests (the distinct val "
        f"captions, one seed each), the {len(pick)} for the second real half's captions "
        f"against the first half of {len(real)} real val images; mean ± sd over "
        f"{args.draws} draws"
    )
    print("| CLIP (ruler) | samples of | guidance | fd_clip | floor | fd / floor | cmmd_clip "
          "| cmmd floor |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['clip']} ({label[r['clip']]}) | {r['samples']} ({names[r['samples']]}) | "
            f"{r['guidance']:g} | {r['fd_clip']:.3f} ± {r['fd_clip_sd']:.3f} | "
            f"{r['fd_clip_real_halves']:.3f} | "
            f"{r['fd_clip_ratio']:.2f} ± {r['fd_clip_ratio_sd']:.2f} | "
            f"{r['cmmd_clip']:.3f} ± {r['cmmd_clip_sd']:.3f} | {r['cmmd_clip_real_halves']:.3f} |"
        )
    print(
        f"\nPooled: {args.pool} samples, one for each of {args.pool} train captions, against "
        f"{args.ref} other real train images; the floor is those captions' own images "
        f"against the same reference"
    )
    print("| CLIP (ruler) | samples of | guidance | fd_clip | floor | fd / floor | cmmd_clip "
          "| cmmd floor | clip score (real) |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        q = r["pooled"]
        print(
            f"| {r['clip']} ({label[r['clip']]}) | {r['samples']} ({names[r['samples']]}) | "
            f"{r['guidance']:g} | {q['fd_clip']:.3f} | {q['fd_floor']:.3f} | "
            f"{q['fd_ratio']:.2f} | {q['cmmd_clip']:.3f} | {q['cmmd_floor']:.3f} | "
            f"{q['clip_score']:.3f} ({q['clip_score_real']:.3f}) |"
        )


if __name__ == "__main__":
    main()
