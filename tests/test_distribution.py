"""FD and CMMD compare the samples with the real val images drawn for the same captions.

Val shards keep a collection's order, which is often by category (Twemoji: flags, then
faces, ...). evaluate took the first m samples, those of the first m val captions, and
set them against a real half spread over every caption: a perfect generator scored as
far from the data as its first categories are from the rest."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from training import config
from training.evaluation.metrics import distribution
from training.evaluation.metrics.base import Samples
from training.intake import shards

SIZE = 32


def _picture(rgb: np.ndarray) -> Image.Image:
    return Image.fromarray(np.full((SIZE, SIZE, 3), rgb, dtype=np.uint8))


def _colour_embeddings(clip_dir: Path, images: list) -> np.ndarray:
    """A stand-in image tower: each picture's mean colour, normalised as CLIP's are."""
    e = np.stack([np.asarray(i.convert("RGB"), dtype=np.float64).mean((0, 1)) for i in images])
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _val_in_category_order(clean: Path, n: int = 80) -> tuple[list[str], list[np.ndarray]]:
    """``n`` val pictures: the first half reds, the second blues, each with its caption."""
    rng = np.random.default_rng(0)
    captions, colours = [], []
    with shards.ShardWriter(clean / "val", "val", 25) as w:
        for i in range(n):
            base = np.array([200, 40, 40]) if i < n // 2 else np.array([40, 40, 200])
            rgb = np.clip(base + rng.normal(0, 25, 3), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            _picture(rgb).save(buf, format="PNG")
            caption = f"{'red' if i < n // 2 else 'blue'} thing {i}"
            w.write(shards.Record(f"{i:06d}", buf.getvalue(), "png", caption, {}))
            captions.append(caption)
            colours.append(rgb)
    return captions, colours


def test_a_perfect_generator_scores_at_the_floor_on_a_collection_in_category_order(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(distribution, "clip_image_embeddings", _colour_embeddings)
    captions, colours = _val_in_category_order(tmp_path / "clean")
    # as evaluate draws them: every distinct val caption, twice, repetition-major; each
    # sample is its caption's real picture (a generator that cannot do better)
    prompts = [c for _ in range(2) for c in captions]
    images = [_picture(colours[i % len(captions)]) for i in range(len(prompts))]
    params = config.resolve({"ingest": {"dataset": "folder", "source": "x", "image_size": SIZE}})
    s = Samples(params, images, prompts, [], None, tmp_path / "clean", tmp_path, tmp_path)

    out = distribution.score(s)

    assert out["fd_pairing"] == "captions"
    assert out["fd_samples"] == len(captions) // 2
    # the samples are the second real half itself: exactly the floor
    assert out["cmmd_clip"] == out["cmmd_clip_real_halves"]
    assert out["fd_clip_ratio"] == 1.0
    # what the first m samples (all red) scored against the same half
    real_e = _colour_embeddings(tmp_path, images[: len(captions)])
    first = distribution.distribution_metrics(real_e[: len(captions) // 2], real_e)
    assert first["cmmd_clip"] > 10 * abs(out["cmmd_clip_real_halves"]) + 1
    assert first["fd_clip_ratio"] > 5


def test_samples_for_other_prompts_are_picked_evenly_across_the_list():
    pick, how = distribution.paired(
        [f"prompt {i}" for i in range(40)], [f"val caption {i}" for i in range(10)]
    )
    assert how == "spread"
    assert len(pick) == 10 and pick[0] == 0 and pick[-1] == 39
    assert all(b - a in (4, 5) for a, b in zip(pick[:-1], pick[1:], strict=True))


def test_a_caption_used_twice_in_the_half_takes_two_samples():
    pick, how = distribution.paired(["a", "b", "a", "b"], ["a", "a"])
    assert (pick, how) == ([0, 2], "captions")
    # one sample of "a" is not enough for two uses: the even spread, not a repeat
    assert distribution.paired(["a", "b"], ["a", "a"])[1] == "spread"


def test_a_val_split_of_one_image_is_skipped_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(distribution, "clip_image_embeddings", _colour_embeddings)
    captions, colours = _val_in_category_order(tmp_path / "clean", n=1)
    params = config.resolve({"ingest": {"dataset": "folder", "source": "x", "image_size": SIZE}})
    images = [_picture(colours[0])] * 2
    s = Samples(params, images, captions * 2, [], None, tmp_path / "clean", tmp_path, tmp_path)
    out = distribution.score(s)  # no second half to pair with: nothing to embed
    assert out["fd_clip_skipped"].startswith("needs >= 2 val images per half")
    assert "have 1 val images" in out["fd_clip_skipped"]


def test_a_prompt_cap_keeps_the_captions_the_distances_compare(tmp_path):
    from training.evaluation.prompts import prompt_set

    captions, _ = _val_in_category_order(tmp_path / "clean", n=12)
    params = config.resolve(
        {"ingest": {"dataset": "folder", "source": "x"}, "evaluate": {"max_prompts": 6}}
    )
    prompts = [p.prompt for p in prompt_set(params, tmp_path / "clean")]
    assert prompts == captions[1::2]  # not the first six: all red
    pick, how = distribution.paired([p for _ in range(2) for p in prompts], captions[1::2])
    assert how == "captions" and pick == list(range(6))
    uncapped = config.resolve({"ingest": {"dataset": "folder", "source": "x"}})
    assert sorted(p.prompt for p in prompt_set(uncapped, tmp_path / "clean")) == sorted(captions)


def test_held_out_compositions_are_left_out_of_the_distances(tmp_path, monkeypatch):
    """A built-in set's val split never holds its held-out compositions (red triangle,
    ...), so a sample of one set against it was charged for composing it right: in
    review a perfect generator read 2.6x the floor and one drawing seen pairs instead
    1.4x. Held-out samples (red here) must not be among those compared."""
    from training.intake import builtin as B

    embedded: list = []

    def embed(clip_dir, images):
        embedded.append(images)
        return _colour_embeddings(clip_dir, images)

    monkeypatch.setattr(distribution, "clip_image_embeddings", embed)
    with shards.ShardWriter(tmp_path / "clean" / "val", "val", 50) as w:
        for i, sample in enumerate(B.shapes(120, SIZE, 0)):  # seen compositions only
            buf = io.BytesIO()
            sample.image.save(buf, format="PNG")
            w.write(shards.Record(f"{i:06d}", buf.getvalue(), "png", sample.caption, {}))
    prompts = B.eval_prompts("shapes")
    assert any(p.held_out for p in prompts)
    images = [_picture([250, 0, 0] if p.held_out else [0, 0, 250]) for p in prompts]
    params = config.resolve({"ingest": {"image_size": SIZE}})
    s = Samples(params, images, [p.prompt for p in prompts], prompts, None,
                tmp_path / "clean", tmp_path, tmp_path)  # fmt: skip
    out = distribution.score(s)
    assert out["fd_pairing"] == "spread" and out["fd_samples"] == 60
    assert not any(np.asarray(im)[0, 0, 0] == 250 for im in embedded[0])


def test_a_floor_of_identical_halves_gives_no_ratio_and_says_why():
    """Val pictures that come in identical pairs make the two real halves the same set:
    a floor of rounding noise (was: clamped at 1e-12, so a close and an unrelated
    generator both read about 1e11 times it, and the gate ranked on that)."""
    rng = np.random.default_rng(0)
    pictures = rng.normal(size=(8, 16))
    real = np.repeat(pictures / np.linalg.norm(pictures, axis=1, keepdims=True), 2, axis=0)
    close = real[1::2] + rng.normal(0, 0.01, size=(8, 16))
    unrelated = rng.normal(3, 1, size=(8, 16))
    for gen in (close, unrelated):
        out = distribution.distribution_metrics(gen, real)
        assert "fd_clip_ratio" not in out
        assert "as good as identical" in out["fd_clip_ratio_skipped"]
        assert out["fd_clip"] > 0  # the distance itself is still there
    # distinct pictures in both halves: a ratio, as before
    distinct = rng.normal(size=(16, 16))
    assert distribution.distribution_metrics(close, distinct)["fd_clip_ratio"] > 0


def test_class_captions_get_a_sample_for_each_image_the_distances_compare(tmp_path, monkeypatch):
    """Captions that repeat (a class per picture: "a cat" x 30, "a dog" x 10) were
    drawn once each: 2 prompts x 2 samples could not pair with the 20 images of the
    compared half, and FD fell back to 2 samples spread against 2 images."""
    from training.evaluation.prompts import prompt_set

    monkeypatch.setattr(distribution, "clip_image_embeddings", _colour_embeddings)
    rng = np.random.default_rng(1)
    colours, captions = {}, []
    with shards.ShardWriter(tmp_path / "clean" / "val", "val", 25) as w:
        for i in range(40):
            caption = "a cat" if i < 30 else "a dog"
            base = np.array([200, 40, 40]) if i < 30 else np.array([40, 40, 200])
            rgb = np.clip(base + rng.normal(0, 25, 3), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            _picture(rgb).save(buf, format="PNG")
            w.write(shards.Record(f"{i:06d}", buf.getvalue(), "png", caption, {}))
            colours.setdefault(caption, rgb)
            captions.append(caption)
    params = config.resolve({"ingest": {"dataset": "folder", "source": "x", "image_size": SIZE}})
    prompts = [p.prompt for p in prompt_set(params, tmp_path / "clean")]
    assert prompts == captions[1::2]  # each as often as the compared half holds it
    drawn = [p for _ in range(2) for p in prompts]  # samples_per_prompt 2, as evaluate
    images = [_picture(colours[p]) for p in drawn]
    s = Samples(params, images, drawn, [], None, tmp_path / "clean", tmp_path, tmp_path)
    out = distribution.score(s)
    assert out["fd_pairing"] == "captions" and out["fd_samples"] == 20


def test_a_pictures_captions_stay_in_one_real_half(tmp_path, monkeypatch):
    """Under ``near_duplicates: image+caption`` a picture's captions are adjacent val
    records with the same bytes. The halves were records 0, 2, 4... and 1, 3, 5..., so
    every picture sat in both: the floor compared copies, and a generator that draws
    new pictures from the very distribution of the real ones read several times it."""
    monkeypatch.setattr(distribution, "clip_image_embeddings", _colour_embeddings)
    rng = np.random.default_rng(3)
    captions = []
    with shards.ShardWriter(tmp_path / "clean" / "val", "val", 50) as w:
        for i in range(80):
            buf = io.BytesIO()
            _picture(rng.integers(20, 236, 3).astype(np.uint8)).save(buf, format="PNG")
            for j in range(3):  # three captions of one picture
                w.write(shards.Record(f"{i:04d}_{j}", buf.getvalue(), "png", f"pic {i} {j}", {}))
                captions.append(f"pic {i} {j}")
    params = config.resolve({"ingest": {"dataset": "folder", "source": "x", "image_size": SIZE}})
    drawn = [c for _ in range(2) for c in captions]
    # a perfect generator: new pictures of the same distribution, none of them in val
    images = [_picture(rng.integers(20, 236, 3).astype(np.uint8)) for _ in drawn]
    s = Samples(params, images, drawn, [], None, tmp_path / "clean", tmp_path, tmp_path)
    out = distribution.score(s)
    assert out["fd_pairing"] == "captions" and out["fd_samples"] == 120
    assert out["fd_clip_ratio"] < 1.6  # 0.52; was 2.6: a floor of copies

    ids = [f"p{i}" for i in range(5) for _ in range(3)]  # 5 pictures x 3 captions
    first, second = distribution.halves(ids)
    assert not {ids[i] for i in first} & {ids[i] for i in second}
    assert distribution.halves(range(5)) == ([0, 2, 4], [1, 3])  # distinct: as before
