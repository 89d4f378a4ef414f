"""End to end on a real collection: Twemoji clip art with free-text captions, fetched
from npm when the test runs (tests/realkit.py; never committed), ingested as a user's
folder. One short pipeline run (tiny sizes, few steps) feeds the assertions: the new
reports exist and are sane. Quality on real data is measured by the benchmark
(benchmarks/real_data.py, RESULTS.md), not here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from training import config
from training.evaluation import guidance as G

from .conftest import copy_project, kiln, py
from .realkit import emoji_folder

pytestmark = pytest.mark.e2e
N_IMAGES = 320
SHORT = {  # a few minutes on 2 cores: this checks the reports, not the quality
    "train_vae.steps": 60,
    "train_clip.steps": 60,
    "train_unet.steps": 120,
    "train_unet.preview_every": 60,
    "evaluate.max_prompts": 24,  # covers the second val half's captions (paired)
    "evaluate.sweep_prompts": 0,
    "validate.val_fraction": 0.1,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("real")
    folder = emoji_folder(root / "emoji", limit=N_IMAGES, seed=0)
    project = copy_project(root / "kiln")
    config.set_values(project / "params.yaml", SHORT)
    proc = kiln(
        project,
        "run",
        "--dataset",
        "folder",
        "--source",
        str(folder),
        "--profile",
        "tiny",
        timeout=3000,
    )
    return project, folder, proc


def _metrics(project: Path, stage: str) -> dict:
    return json.loads((project / "data" / "metrics" / f"{stage}.json").read_text())


def test_the_collection_is_real_transparent_clip_art_with_long_captions(run):
    _, folder, _ = run
    from .realkit import is_transparent

    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == N_IMAGES
    assert all(is_transparent(p.read_bytes()) for p in pngs[:20])
    words = [len(p.with_suffix(".txt").read_text().split()) for p in pngs]
    assert np.median(words) > 8  # free text, far longer than the shapes captions


def test_transparency_lands_on_the_background(run):
    project, _, _ = run
    from training.intake import shards

    recs = list(shards.read(shards.shard_paths(project / "data" / "raw" / "shards")))
    corners = np.stack([np.asarray(r.image())[[0, 0, -1, -1], [0, -1, 0, -1]] for r in recs])
    assert (corners >= 250).mean() > 0.9  # Twemoji corners are transparent: white now


def test_caption_lengths_set_the_context_and_cuts_are_counted(run):
    project, _, proc = run
    v, c = _metrics(project, "validate"), _metrics(project, "train_clip")
    words = v["caption_words"]
    assert words["p50"] > 8
    context = c["context_length"]
    # from the data: 95% of the captions whole, rounded up to 8, within the cap of 77
    assert context == min(77, -(-c["caption_tokens_p95"] // 8) * 8)
    assert context > 24  # tiny's old fixed context would have cut most of them
    lat = _metrics(project, "precompute_latents")
    # train_clip measured every train caption here (fewer than tokenizer_samples), and
    # precompute_latents counted the ones it cut: the same captions, the same count
    assert c["captions_truncated_frac"] == pytest.approx(
        lat["captions_truncated_train"] / lat["train_count"]
    )
    cut = lat["captions_truncated_train"] + lat["captions_truncated_val"]
    if cut:  # never silent: said in the log, with the count
        total = lat["train_count"] + lat["val_count"]
        assert f"warning: {cut} of {total} captions are longer" in proc.stderr + proc.stdout
    if c["captions_truncated_frac"]:
        assert "of the captions are longer than" in proc.stderr + proc.stdout
    manifest = json.loads((project / "data" / "latents" / "manifest.json").read_text())
    assert manifest["tensors"]["text"]["shape"][0] == context


def test_duplicates_policy_and_pairs_page(run):
    """The default policy (``image``) drops Twemoji's skin-tone variants, which carry
    captions of their own: the page shows them side by side for the user to decide."""
    project, _, _ = run
    report = json.loads((project / "data" / "validation" / "report.json").read_text())
    dup = report["duplicates"]
    assert dup["policy"] == "image" and dup["rejected"] > 0
    assert report["rejected_by_check"].get("near_duplicate", 0) > 0
    page = (project / "data" / "clean" / dup["page"]).read_text()
    for pair in dup["first_pairs"]:
        assert f"<code>{pair['key']}</code>" in page and f"<code>{pair['earlier']}</code>" in page
    assert page.count("data:image/png;base64,") == 2 * len(dup["first_pairs"])
    assert "skin tone" in page  # the variants' own captions are shown


def test_held_out_loss_memorisation_and_caption_grid_in_the_evaluation(run):
    project, _, _ = run
    u, e = _metrics(project, "train_unet"), _metrics(project, "evaluate")
    assert 0 < u["val_loss"] < 1.5
    # the evaluation scores the registered pipeline's U-Net on the same fixed draws
    assert e["val_loss"] == pytest.approx(u["val_loss"], rel=1e-4)
    assert 0.0 <= e["copies_frac"] <= 1.0 and 0.0 <= e["copies_frac_val"] <= 1.0
    assert e["nn_train_dist_median"] > 0 and e["nn_train_dist_median_val"] > 0
    assert e["fd_clip_ratio"] == pytest.approx(e["fd_clip"] / e["fd_clip_real_halves"])
    # the samples set beside the real half are those of its captions (test_distribution)
    assert e["fd_pairing"] == "captions"
    assert 0 < e["vae_ssim"] <= 1
    html = (project / "data" / "eval" / "report.html").read_text()
    assert "Val captions: the real image, then the samples" in html
    assert "Memorisation: samples within" in html


def test_user_data_gates_on_fd_ratio(run):
    project, _, proc = run
    e = _metrics(project, "evaluate")
    assert e["gate_metric"] == "fd_clip_ratio" and e["gate_direction"] == "lower"
    # every metric params.yaml may name for the gate on data without an oracle is measured
    assert [m for m in config.gate_metrics(None) if m not in e] == []
    assert "gate: kiln-text2image v1 fd_clip_ratio=" in proc.stderr + proc.stdout


def test_the_guidance_is_chosen_on_the_data_and_ships_with_the_model(run, tmp_path):
    """evaluate samples training captions at each candidate guidance, adopts the one whose
    samples are closest to other training images, and the registered pipeline carries it:
    ``kiln generate`` and the REST model default to it (evaluation/guidance.py)."""
    from types import SimpleNamespace

    from training.inference.text2image_model import Text2Image

    project, _, proc = run
    e = _metrics(project, "evaluate")
    ev = config.load(project / "params.yaml").evaluate
    # every scale guided throughout, and the interval pair (evaluation/guidance.py, ``pairs``)
    fds = {
        (g, s): e[f"guidance_{G.label(g, s)}_fd_train"]
        for g, s in G.pairs(ev.guidance_candidates, ev.guidance_interval_candidates)
    }
    chosen = (e["guidance"], e["guidance_start"])
    assert len(fds) == 2 and (3.0, 0.4) in fds and chosen == min(fds, key=fds.get)
    assert e["guidance_source"].startswith("chosen: the lowest FD of ")
    # each candidate's FD also as its ratio to the pool captions' own images (the floor)
    assert e["guidance_fd_floor"] > 0
    for (g, s), fd in fds.items():
        assert e[f"guidance_{G.label(g, s)}_fd_ratio"] == pytest.approx(fd / e["guidance_fd_floor"])
    assert f"guidance {G.describe(*chosen)} chosen" in proc.stdout + proc.stderr
    assert "Guidance chosen for this model" in (project / "data/eval/report.html").read_text()
    pipe_dir = project / "data" / "eval" / "pipeline"
    saved = json.loads((pipe_dir / "kiln_sampler.json").read_text())
    assert (saved["guidance"], saved["guidance_start"]) == chosen
    # from the registry (the champion: v1, this run's), as a user calls it
    out = tmp_path / "gen"
    made = kiln(project, "generate", "a red heart", "--steps", "2", "--out", str(out))
    line = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert (line["guidance"], line["guidance_start"]) == chosen
    assert f"(guidance {G.describe(*chosen)}, the model's)" in made.stdout
    asked = kiln(project, "generate", "a red heart", "--steps", "2", "--guidance", "4",
                 "--guidance-start", "0.5", "--out", str(tmp_path / "asked"))  # fmt: skip
    assert "(guidance 4 from 50% of the steps on, as asked)" in asked.stdout
    line = json.loads((tmp_path / "asked/manifest.jsonl").read_text().splitlines()[0])
    assert (line["guidance"], line["guidance_start"]) == (4.0, 0.5)
    # the REST model, loaded from the registry as `mlflow models serve` loads it
    served = py(project, """
import mlflow
from training import tracking
tracking.setup()
m = mlflow.pyfunc.load_model("models:/kiln-text2image@champion")
d = m.unwrap_python_model().defaults
print("guidance", d["guidance"], d["guidance_start"])
""")  # fmt: skip
    assert f"guidance {e['guidance']} {e['guidance_start']}" in served
    # an export keeps the file; a scale no candidate had proves it is the one read
    kiln(project, "export", str(tmp_path / "sd"))
    shipped = tmp_path / "sd" / "kiln_sampler.json"
    assert json.loads(shipped.read_text())["guidance"] == e["guidance"]
    shipped.write_text(json.dumps({"guidance": 3.7}))
    kiln(project, "generate", "a red heart", "--steps", "2", "--model", str(tmp_path / "sd"),
         "--out", str(tmp_path / "own"))  # fmt: skip
    assert json.loads((tmp_path / "own/manifest.jsonl").read_text())["guidance"] == 3.7
    mine = Text2Image()
    mine.load_context(SimpleNamespace(artifacts={"pipeline": str(tmp_path / "sd")}))
    assert mine.defaults["guidance"] == 3.7


def test_a_fixed_ruler_measures_every_version_in_one_space(run):
    """``kiln ruler`` trains and registers a CLIP of its own; with ``evaluate.ruler``
    set, the evaluation measures fd_clip and cmmd_clip, for the new version and the
    re-scored champion alike, with that CLIP and not the run's. Last in this module: it
    changes params.yaml and registers a second pipeline version."""
    from mlflow import MlflowClient

    project, _, _ = run
    own = _metrics(project, "evaluate")
    made = kiln(project, "ruler", "--steps", "40", timeout=1200)
    out = made.stdout + made.stderr
    assert "ruler: registered models:/kiln-ruler/1 (seed 1, 40 steps, profile tiny" in out
    assert "params.yaml: evaluate.ruler: None -> models:/kiln-ruler/1" in out
    assert config.load(project / "params.yaml").evaluate.ruler == "models:/kiln-ruler/1"
    ruler = json.loads((project / "data" / "ruler" / "resolved_params.json").read_text())
    assert ruler["seed"] == 1 and ruler["train_clip"]["steps"] == 40
    assert not (project / "data" / "checkpoints" / "ruler").exists()  # done: no resume state

    proc = kiln(project, "evaluate", timeout=1800)
    e = _metrics(project, "evaluate")
    assert e["ruler"] == "models:/kiln-ruler/1"
    assert "measured with the fixed ruler models:/kiln-ruler/1" in proc.stdout + proc.stderr
    # the same val images, another CLIP: another floor (the run's own CLIP gave `own`'s)
    assert e["fd_clip_real_halves"] != pytest.approx(own["fd_clip_real_halves"], rel=1e-3)
    # the champion (v1) was re-scored on the same requests with the same ruler: the
    # same real images in the same space give the very same floor
    assert e["champion_version"] == 1
    assert e["champion_guidance"] == own["guidance"]  # v1 sampled at its own chosen scale
    assert e["champion.fd_clip_real_halves"] == pytest.approx(e["fd_clip_real_halves"])
    assert e["fd_clip_ratio"] == pytest.approx(e["fd_clip"] / e["fd_clip_real_halves"])
    assert (
        "<td>ruler</td><td>models:/kiln-ruler/1</td>"
        in (project / "data" / "eval" / "report.html").read_text()
    )
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    tags = client.get_model_version("kiln-ruler", "1").tags
    assert tags["ruler.seed"] == "1" and tags["ruler.steps"] == "40"
    assert tags["ruler.collection"] == _metrics(project, "train_clip")["loader_index_fingerprint"]
