"""The guidance scale is chosen per model on its own data (evaluation/guidance.py) and the
pipeline carries it to its callers (``inference/defaults.py``).

The end-to-end check (evaluate picks, ``kiln generate`` and the REST model default to
the pick) is in test_real_data.py; these pin the rule and the file's handling with
stand-ins for the sampler and the CLIP tower, which a unit test cannot train."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from training.config import SAMPLER
from training.evaluation import guidance as G
from training.evaluation.metrics import clip_score, distribution
from training.inference import defaults, sampling
from training.intake import shards

SIZE = 16


def _picture(rgb) -> Image.Image:
    return Image.fromarray(np.full((SIZE, SIZE, 3), rgb, dtype=np.uint8))


def _write(split_dir: Path, colours: list) -> None:
    with shards.ShardWriter(split_dir, split_dir.name, 40) as w:
        for i, rgb in enumerate(colours):
            buf = io.BytesIO()
            _picture(rgb).save(buf, format="PNG")
            w.write(shards.Record(f"{i:06d}", buf.getvalue(), "png", f"thing {i}", {}))


def _mean_colour(clip_dir: Path, images: list) -> np.ndarray:
    """A stand-in image tower: each picture's mean colour."""
    return np.stack([np.asarray(i, dtype=np.float64).mean((0, 1)) for i in images]) / 255


def test_the_pool_and_reference_are_a_seeded_disjoint_pick_across_the_train_split(tmp_path):
    # in the collection's order: 120 reds, then 120 blues (the first 60 would be all red)
    rng = np.random.default_rng(0)
    colours = [
        np.clip(base + rng.normal(0, 10, 3), 0, 255).astype(np.uint8)
        for base in [np.array([200, 30, 30])] * 120 + [np.array([30, 30, 200])] * 120
    ]
    _write(tmp_path / "train", colours)
    ref, pool, caps = G.training_pool(tmp_path, SIZE, n_pool=30, n_ref=60, seed=3)
    assert (len(ref), len(pool), len(caps)) == (60, 30, 30)
    reds = sum(np.asarray(p)[0, 0, 0] > 100 for p in ref)
    assert 15 < reds < 45  # both halves, not the first 60
    # each caption is its own image's ("thing i" was written with colours[i])
    for image, cap in zip(pool, caps, strict=True):
        i = int(cap.split()[1])
        assert np.abs(np.asarray(image, dtype=int)[0, 0] - colours[i]).max() <= 1
    # disjoint: no reference image is a pool image
    assert not {p.tobytes() for p in pool} & {r.tobytes() for r in ref}
    again = G.training_pool(tmp_path, SIZE, n_pool=30, n_ref=60, seed=3)
    assert again[2] == caps and [r.tobytes() for r in again[0]] == [r.tobytes() for r in ref]
    # a split smaller than both is shared in their proportion (1 : 2)
    ref, pool, caps = G.training_pool(tmp_path, SIZE, n_pool=100, n_ref=200)
    assert (len(pool), len(ref)) == (80, 160)


def test_the_choice_samples_training_captions_against_other_training_images(tmp_path, monkeypatch):
    """Samples at guidance g are grey level 40*g: training images are grey 80 (g=2),
    val images grey 120 (g=3). The pick must be 2, and the prompts are training
    captions: a choice made on the val split would grade itself against what evaluate
    then reports on, and a few val captions' FD weighs spread over closeness and has
    no matched floor (until 2026-12-06 it sampled the distinct val captions)."""
    rng = np.random.default_rng(0)

    def grey(level: float) -> np.ndarray:  # a little colour noise: a full-rank covariance
        return np.clip(level + rng.normal(0, 3, 3), 0, 255).astype(np.uint8)

    _write(tmp_path / "train", [grey(80) for _ in range(60)])
    _write(tmp_path / "val", [grey(120) for _ in range(20)])
    seen: list[tuple[float, str]] = []

    def fake_generate(pipe, requests, batch_size=8, deadline=None, control=None):
        seen.extend((r.guidance, r.prompt) for r in requests)
        assert all(r.guidance_start == 0 for r in requests)
        return [_picture(grey(40 * r.guidance)) for r in requests]

    monkeypatch.setattr(sampling, "generate", fake_generate)
    monkeypatch.setattr(distribution, "clip_image_embeddings", _mean_colour)
    monkeypatch.setattr(clip_score, "clip_scores", lambda d, p, i: np.full(len(i), 0.5))
    got = G.choose(None, G.pairs((1.5, 2.0, 3.0)), tmp_path, tmp_path, tmp_path,
                   SIZE, 4, "", 0, 8, n_pool=20, n_ref=40)  # fmt: skip
    assert got["guidance"] == 2.0 and got["start"] == 0.0
    assert [r["guidance"] for r in got["table"]] == [1.5, 2.0, 3.0]
    # 20 of the 60 training images sampled for, the other 40 the reference
    assert got["prompts"] == 20 and got["reference"] == 40
    assert [g for g, _ in seen] == [1.5] * 20 + [2.0] * 20 + [3.0] * 20
    prompts = [p for g, p in seen if g == 1.5]
    assert len(set(prompts)) == 20 and all(p.startswith("thing ") for p in prompts)
    assert [p for g, p in seen if g == 3.0] == prompts  # the same captions and seeds
    rows = {r["guidance"]: r for r in got["table"]}
    assert rows[2.0]["fd_train"] < rows[1.5]["fd_train"] < rows[3.0]["fd_train"]
    # each FD also as a ratio to the pool images' own (the matched floor)
    assert got["floor"] > 0
    for r in got["table"]:
        assert r["fd_ratio"] == pytest.approx(r["fd_train"] / got["floor"])


def test_a_guidance_start_is_a_candidate_measured_like_the_scale(tmp_path, monkeypatch):
    """Samples are grey 40 * g - 100 * start; training images are grey 100: guidance 3
    from 20% of the steps on (40 * 3 - 100 * 0.2), not any scale guided throughout."""
    rng = np.random.default_rng(1)

    def grey(level: float) -> np.ndarray:
        return np.clip(level + rng.normal(0, 3, 3), 0, 255).astype(np.uint8)

    _write(tmp_path / "train", [grey(100) for _ in range(60)])
    seen: list[tuple[float, float]] = []

    def fake_generate(pipe, requests, batch_size=8, deadline=None, control=None):
        seen.extend((r.guidance, r.guidance_start) for r in requests)
        return [_picture(grey(40 * r.guidance - 100 * r.guidance_start)) for r in requests]

    monkeypatch.setattr(sampling, "generate", fake_generate)
    monkeypatch.setattr(distribution, "clip_image_embeddings", _mean_colour)
    monkeypatch.setattr(clip_score, "clip_scores", lambda d, p, i: np.full(len(i), 0.5))
    candidates = G.pairs((1.0, 2.0, 3.0), ((2.0, 0.2), (3.0, 0.2), (1.0, 0.2), (3.0, 0.0)))
    # guidance 1 is unguided at every step: its start changes nothing, so it is tried once;
    # (3, 0) is the scale 3 already there
    assert candidates == [(1.0, 0.0), (2.0, 0.0), (3.0, 0.0), (2.0, 0.2), (3.0, 0.2)]
    got = G.choose(None, candidates, tmp_path, tmp_path, tmp_path, SIZE, 4, "", 0, 8,
                   n_pool=20, n_ref=40)  # fmt: skip
    assert (got["guidance"], got["start"]) == (3.0, 0.2)
    assert sorted(set(seen)) == sorted(candidates) and len(seen) == 20 * len(candidates)
    assert G.label(3.0, 0.2) == "3_from0.2" and G.label(3.0, 0.0) == "3"


def test_too_little_to_measure_is_a_recorded_skip(tmp_path):
    _write(tmp_path / "train", [np.full(3, 80, np.uint8)] * 3)
    got = G.choose(None, G.pairs((1.5, 2.0)), tmp_path, tmp_path, tmp_path, SIZE, 4, "", 0,
                   8, n_pool=1, n_ref=2)  # fmt: skip
    assert got["skipped"] == (
        "needs >= 2 training images for the pool and as many for the reference, have 1 and 2"
    )


def test_a_pipeline_carries_its_guidance_to_its_callers(tmp_path):
    assert defaults.recommended(tmp_path) == SAMPLER  # saved before there was a choice
    (tmp_path / defaults.SAMPLER_FILE).write_text(json.dumps({"guidance": 1.5}))
    rec = defaults.recommended(tmp_path)
    # a file from before the interval: guided at every step, as it was sampled then
    assert rec.guidance == 1.5 and rec.guidance_start == 0.0 and rec.steps == SAMPLER.steps
    (tmp_path / defaults.SAMPLER_FILE).write_text('{"guidance": 3, "guidance_start": 0.4}')
    rec = defaults.recommended(tmp_path)
    assert (rec.guidance, rec.guidance_start) == (3.0, 0.4)
    for bad in ("{", '{"steps": 3}', '{"guidance": -1}', '{"guidance": true}', "[1]",
                '{"guidance": 2, "guidance_start": 1}',
                '{"guidance": 2, "guidance_start": "0"}'):  # fmt: skip
        (tmp_path / defaults.SAMPLER_FILE).write_text(bad)
        with pytest.raises(ValueError, match="kiln_sampler.json"):
            defaults.recommended(tmp_path)


def test_a_rest_row_without_guidance_gets_the_models(tmp_path):
    from training.inference import text2image_model as T

    rows = pd.DataFrame({"prompt": ["a", "b"], "guidance": [None, 4.0],
                         "guidance_start": [0.2, None]})  # fmt: skip
    mine = T.DEFAULTS | {"guidance": 1.5, "guidance_start": 0.4}
    got = T.parse_requests(rows, 8, 1000, None, mine)
    assert [(r.guidance, r.guidance_start) for r in got] == [(1.5, 0.2), (4.0, 0.4)]
    theirs = T.parse_requests(rows, 8, 1000)[1]
    assert (theirs.guidance, theirs.guidance_start) == (4.0, SAMPLER.guidance_start)
    with pytest.raises(T.BadRequest, match="row 0: guidance_start must be a fraction"):
        T.parse_requests(pd.DataFrame({"prompt": ["a"], "guidance_start": [1.0]}), 8, 1000)


def test_no_finite_distance_is_a_recorded_skip_not_a_pick(tmp_path, monkeypatch):
    _write(tmp_path / "train", [np.full(3, 80 + i, np.uint8) for i in range(8)])
    monkeypatch.setattr(
        sampling, "generate", lambda pipe, reqs, **kw: [_picture(np.full(3, 90)) for _ in reqs]
    )
    monkeypatch.setattr(distribution, "clip_image_embeddings", _mean_colour)
    monkeypatch.setattr(distribution, "frechet_distance", lambda a, b: float("nan"))
    monkeypatch.setattr(clip_score, "clip_scores", lambda d, p, i: np.full(len(i), 0.5))
    got = G.choose(None, G.pairs((1.5, 2.0)), tmp_path, tmp_path, tmp_path, SIZE, 4, "", 0,
                   8, n_pool=3, n_ref=5)  # fmt: skip
    assert got == {"skipped": "no candidate has a finite FD to the training images"}


def test_what_keeps_evaluate_guidance_samples_nothing():
    from training import config

    def adopt(overrides: dict) -> tuple[tuple[float, float], dict]:
        params = config.resolve(overrides)
        metrics: dict = {}
        # pipe=None: any sampling would fail here
        return G.adopt(params, None, Path("."), Path("."), Path("."), metrics, {}), metrics

    g, m = adopt({"ingest": {"dataset": "shapes"}})  # a built-in set: its oracle chose 2
    assert g == (SAMPLER.guidance, 0.0) and m["guidance_source"].startswith("evaluate.guidance")
    folder = {"ingest": {"dataset": "folder", "source": "x"}}
    g, m = adopt({**folder, "evaluate": {"guidance": 3.0, "guidance_start": 0.3,
                                         "guidance_candidates": [],
                                         "guidance_interval_candidates": []}})  # fmt: skip
    assert g == (3.0, 0.3) and "no candidates" in m["guidance_source"]
    assert m["guidance_start"] == 0.3
    g, m = adopt({**folder, "evaluate": {"guidance_candidates": [2.5],
                                         "guidance_interval_candidates": []}})  # fmt: skip
    assert g == (m["guidance"], m["guidance_start"]) == (2.5, 0.0)
    g, m = adopt({**folder, "evaluate": {"guidance_candidates": [],
                                         "guidance_interval_candidates": [[3, 0.4]]}})  # fmt: skip
    assert g == (m["guidance"], m["guidance_start"]) == (3.0, 0.4)
    assert m["guidance_source"] == "the only candidate"


def test_candidates_are_distinct_finite_scales():
    from training import config

    for bad in ([1.5, 1.5], [float("inf")], [101.0], [-1.0]):
        with pytest.raises(config.ConfigError):
            config.resolve({"evaluate": {"guidance_candidates": bad}})
    for bad in ([[3, 0.4], [3, 0.4]], [[3, 1.0]], [[3, -0.1]], [[3, float("nan")]], [[3]]):
        with pytest.raises(config.ConfigError):
            config.resolve({"evaluate": {"guidance_interval_candidates": bad}})
    for bad in (1, 5000):  # a pool of one has no covariance; the pool is held in memory
        with pytest.raises(config.ConfigError, match="guidance_pool"):
            config.resolve({"evaluate": {"guidance_pool": bad}})
    got = config.resolve({"evaluate": {"guidance_interval_candidates": [[2, 0.3], [3, 0.4]]}})
    assert got.evaluate.guidance_interval_candidates == ((2.0, 0.3), (3.0, 0.4))


def test_no_setting_holds_a_scale_below_1():
    """Requests refuse guidance below 1 (diffusers draws it as 1, so the picture would
    not be what its record says): evaluate must not sample, choose or save one either."""
    from training import config

    for section in (
        {"guidance": 0.5},
        {"guidance_candidates": [0.5, 2.0]},
        {"guidance_interval_candidates": [[0.5, 0.4]]},
        {"sweep_guidance": [0.0, 2.0]},
    ):
        with pytest.raises(config.ConfigError, match="greater than or equal to 1"):
            config.resolve({"evaluate": section})
    ok = config.resolve({"evaluate": {"guidance": 1, "sweep_guidance": [1, 100]}})
    assert ok.evaluate.sweep_guidance == (1.0, 100.0)


def test_a_playground_job_without_guidance_samples_each_version_at_its_own():
    from training.playground.jobs import Settings

    assert [r.guidance for r in Settings(prompt="p", n=2).requests(own=1.5)] == [1.5, 1.5]
    asked = Settings(prompt="p", guidance=4.0).requests(own=1.5, own_start=0.4)[0]
    assert (asked.guidance, asked.guidance_start) == (4.0, 0.4)  # the start is the version's
    Settings(prompt="p").check()  # checked at the default scale before it is queued
