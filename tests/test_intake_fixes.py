"""Intake fixes: ordinary Unicode captions, duplicates of rejected samples, resize modes
that validate cannot use, size checks on the picture as it was, and file names that are
not UTF-8."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from training import config
from training.intake import shards, validate


def _picture(i: int, size: int = 24) -> Image.Image:
    """A distinct textured picture per i (flat colours all share one difference hash)."""
    rng = np.random.default_rng(700 + i)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    return coarse.resize((size, size), Image.Resampling.BICUBIC)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _params(ingest_cfg: dict | None = None, **validate_cfg) -> config.Params:
    return config.resolve(
        {
            "ingest": {
                "dataset": "url-list",
                "processes": 1,
                "threads": 4,
                "samples_per_shard": 10,
                **(ingest_cfg or {}),
            },
            "validate": {"val_fraction": 0.5, "samples_per_shard": 50, **validate_cfg},
        }
    )


def _raw(raw: Path, samples: list[tuple[str, bytes, str, dict]]) -> None:
    with shards.ShardWriter(raw / "shards", "raw", 50) as w:
        for key, image, caption, meta in samples:
            w.write(shards.Record(key, image, "png", caption, meta))


FILLER = 8  # good samples appended to every set, so the train/val split has both


def _gate(tmp_path: Path, samples, params: config.Params | None = None):
    """validate.run over ``samples`` (+ FILLER good ones after them): (report,
    {key: failed_checks}, {key: caption} of the kept samples but the filler)."""
    filler = [
        (f"fill{i}", _png(_picture(100 + i)), f"filler {i}", {"url": f"http://fill/{i}.png"})
        for i in range(FILLER)
    ]
    _raw(tmp_path / "raw", [*samples, *filler])
    report = validate.run(params or _params(), tmp_path / "raw", tmp_path / "clean")
    rejects = pd.read_parquet(tmp_path / "clean" / "rejects.parquet")
    kept = {}
    for split in ("train", "val"):
        for r in shards.read(shards.shard_paths(tmp_path / "clean" / split)):
            if not r.key.startswith("fill"):
                kept[r.key] = r.caption
    return report, dict(zip(rejects.key, rejects.failed_checks, strict=True)), kept


# ---- 1: captions with ordinary Unicode are text; control characters are not ------------
UNICODE_CAPTIONS = {
    "nbsp": "a red\u00a0square",
    "ideographic": "赤い\u3000四角",
    "thin": "a 5\u2009cm square",
    "zwj": "👨\u200d👩 family",
    "soft_hyphen": "a wonder\u00adful square",
    "multiline": "a red square\non grass,\r\n\tat noon",
}


def test_unicode_captions_pass_and_control_characters_still_fail(tmp_path: Path):
    controls = {"nul": "a red\x00square", "esc": "\x1b[31ma red square", "sep": "a\x1fb c"}
    samples = [
        (k, _png(_picture(i)), cap, {"url": f"http://h/{k}"})
        for i, (k, cap) in enumerate({**UNICODE_CAPTIONS, **controls}.items())
    ]
    report, rejected, kept = _gate(tmp_path, samples)
    assert rejected == dict.fromkeys(controls, "caption_printable")
    assert set(kept) == set(UNICODE_CAPTIONS)
    assert report["rejected_by_check"] == {"caption_printable": 3}
    rejects = pd.read_parquet(tmp_path / "clean" / "rejects.parquet")
    assert set(rejects.reason) == {"caption has control characters"}
    # whitespace runs become one space in the clean shards (what training reads)
    assert kept["multiline"] == "a red square on grass, at noon"
    assert kept["nbsp"] == "a red square" and kept["ideographic"] == "赤い 四角"
    assert kept["zwj"] == "👨\u200d👩 family"  # the joiner is not whitespace: kept
    assert kept["soft_hyphen"] == UNICODE_CAPTIONS["soft_hyphen"]


def test_a_caption_of_invisible_characters_alone_is_empty(tmp_path: Path):
    """Were 1 character, printable, and trained as a caption: a zero-width space, a
    second byte-order mark, a word joiner and a soft hyphen draw nothing."""
    invisible = {"zwsp": "\u200b", "bom": "\ufeff", "joiner": "\u2060 \u00ad"}
    samples = [
        (k, _png(_picture(20 + i)), cap, {"url": f"http://h/{k}"})
        for i, (k, cap) in enumerate({**invisible, "zwj": UNICODE_CAPTIONS["zwj"]}.items())
    ]
    report, rejected, kept = _gate(tmp_path, samples)
    assert rejected == dict.fromkeys(invisible, "caption_chars")
    assert set(kept) == {"zwj"}  # joined emoji are text


def test_web_captions_are_stored_as_the_text_a_prompt_types(tmp_path: Path):
    """Were kept as written: "Tom &amp; Jerry" trained the tokens & amp ; where a prompt
    says "&", and full-width letters and ligatures other bytes than "red" and "fish".
    Only references with their ";" are read, and none that would make a control
    character (a caption of those is still rejected, not silently changed)."""
    web = {
        "amp": ("Tom &amp; Jerry &amp;amp; &quot;friends&quot;", 'Tom & Jerry & "friends"'),
        "num": ("a car &#x1F697;&nbsp;&#233;t&#233;", "a car 🚗 été"),
        "wide": ("ＲＥＤ ｃａｒ, ﬁsh", "RED car, fish"),
        "legacy": ("a &notice AT&T", "a &notice AT&T"),  # html.unescape: "a ¬ice"
        "control": ("a&#31;b", "a&#31;b"),
    }
    samples = [
        (k, _png(_picture(40 + i)), cap, {"url": f"http://h/{k}"})
        for i, (k, (cap, _)) in enumerate(web.items())
    ]
    _, rejected, kept = _gate(tmp_path, samples)
    assert not rejected
    assert kept == {k: plain for k, (_, plain) in web.items()}


# ---- 2: a rejected sample claims no picture and no URL ---------------------------------
def test_a_good_copy_of_a_rejected_sample_is_kept(tmp_path: Path):
    """The folder repro: a.png without a caption, b.png the same picture captioned."""
    same = _png(_picture(0))
    near = _png(_picture(1).resize((48, 48), Image.Resampling.BICUBIC))
    samples = [
        ("a", same, "", {"url": "kiln://folder/a.png"}),
        ("b", same, "a red square", {"url": "kiln://folder/b.png"}),
        ("c", same, "a red square again", {"url": "kiln://folder/c.png"}),  # copy of b
        ("n0", _png(_picture(1)), "", {"url": "kiln://folder/n0.png"}),
        ("n1", near, "a rescaled picture", {"url": "kiln://folder/n1.png"}),
        ("u0", b"not a png", "broken", {"url": "http://h/u.png"}),
        ("u1", _png(_picture(2)), "the same URL, working", {"url": "http://h/u.png"}),
        ("u2", _png(_picture(3)), "the same URL again", {"url": "http://h/u.png"}),
    ]
    report, rejected, kept = _gate(tmp_path, samples)
    assert rejected == {
        "a": "caption_chars",
        "n0": "caption_chars",
        "u0": "decoded, width, height, file_bytes",  # 9 bytes, no size
        "c": "duplicate_image",
        "u2": "duplicate_url",
    }
    assert set(kept) == {"b", "n1", "u1"}
    # the pairs page names the kept sample as the earlier copy
    assert [(p["key"], p["earlier"]) for p in report["duplicates"]["first_pairs"]] == [("c", "b")]
    assert report["duplicates"]["rejected"] == 1


def test_a_duplicate_that_fails_otherwise_still_lists_both_reasons(tmp_path: Path):
    same = _png(_picture(0))
    samples = [
        ("a", same, "a red square", {"url": "http://h/a"}),
        ("b", same, "", {"url": "http://h/b"}),
        ("c", same, "a red square", {"url": "http://h/c"}),
    ]
    report, rejected, kept = _gate(tmp_path, samples)
    assert rejected == {"b": "caption_chars, duplicate_image", "c": "duplicate_image"}
    assert set(kept) == {"a"}
    assert {(p["key"], p["earlier"]) for p in report["duplicates"]["first_pairs"]} == {
        ("b", "a"),
        ("c", "a"),
    }


def test_duplicates_across_chunks_follow_read_order(tmp_path: Path):
    """The first copy fails at the end of one chunk, the good one is in the next."""
    same = _png(_picture(0))
    samples = [
        (f"{i:02d}", _png(_picture(10 + i)), f"picture {i}", {"url": f"h/{i}"}) for i in range(9)
    ]
    samples.append(("09", same, "", {"url": "h/9"}))
    samples.append(("10", same, "the red square", {"url": "h/10"}))
    samples.append(("11", same, "the red square, again", {"url": "h/11"}))
    _, rejected, kept = _gate(tmp_path, samples, _params(chunk_rows=10))
    assert rejected == {"09": "caption_chars", "11": "duplicate_image"}
    assert set(kept) == {f"{i:02d}" for i in range(9)} | {"10"}


# ---- 3: resize modes that leave non-square images are refused at load ----------------
@pytest.mark.parametrize("mode", ["keep_ratio", "no"])
def test_resize_modes_that_leave_odd_sizes_fail_at_load(tmp_path: Path, mode: str):
    path = tmp_path / "params.yaml"
    path.write_text(f"ingest:\n  resize_mode: {mode}\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert "ingest.resize_mode" in str(err.value) and str(path) in str(err.value)
    assert "'buckets', 'border' or 'center_crop'" in str(err.value)


@pytest.mark.parametrize("mode", ["buckets", "border", "center_crop"])
def test_the_square_making_resize_modes_still_load(mode: str):
    assert _params({"resize_mode": mode}).ingest.resize_mode == mode


# ---- 4: min_side and max_aspect_ratio judge the picture as it was ---------------------
def _folder(src: Path, pictures: dict[str, Image.Image]) -> None:
    src.mkdir(parents=True, exist_ok=True)
    for name, img in pictures.items():
        img.save(src / f"{name}.png")
        (src / f"{name}.txt").write_text(f"the picture called {name}\n")


def test_size_checks_see_the_original_size_through_ingest(tmp_path: Path):
    """img2dataset upscales the 2x2 picture to image_size and pads the 300x20 one to a
    square (``border``): the stored images pass any size check, the originals must not."""
    from training.intake import ingest

    pictures = {f"good{i}": _picture(200 + i, 40) for i in range(FILLER)}
    pictures["tiny"] = _picture(300, 2)
    pictures["strip"] = _picture(301, 40).resize((300, 20))
    _folder(tmp_path / "src", pictures)
    params = _params(
        {"dataset": "folder", "source": str(tmp_path / "src"), "resize_mode": "border"},
        min_side=8,
        max_aspect_ratio=2.0,
    )
    ingest.run(params, tmp_path / "raw", tmp_path / "work")
    stored = {
        r.meta["url"].rsplit("/", 1)[1]: (r.image().size, r.meta["original_width"])
        for r in shards.read(shards.shard_paths(tmp_path / "raw" / "shards"))
    }
    side = params.ingest.image_size
    assert stored["tiny.png"] == ((side, side), 2) and stored["strip.png"] == ((side, side), 300)
    validate.run(params, tmp_path / "raw", tmp_path / "clean")
    rejects = pd.read_parquet(tmp_path / "clean" / "rejects.parquet")
    failed = {
        u.rsplit("/", 1)[1]: f for u, f in zip(rejects.url, rejects.failed_checks, strict=True)
    }
    assert failed == {"tiny.png": "width, height", "strip.png": "aspect"}


def test_size_checks_fall_back_to_the_stored_size_without_originals(tmp_path: Path):
    samples = [
        ("small", _png(_picture(1, 4)), "a small picture", {"url": "h/s"}),
        ("wide", _png(_picture(2, 30).resize((90, 30))), "a wide picture", {"url": "h/w"}),
        # recorded originals win over the stored size, bad values are ignored
        (
            "was_small",
            _png(_picture(3, 32)),
            "was small",
            {"original_width": 4, "original_height": 4},
        ),
        (
            "junk",
            _png(_picture(4, 32)),
            "junk sizes",
            {"original_width": "4", "original_height": None},
        ),
        (
            "flag",
            _png(_picture(5, 32)),
            "bool sizes",
            {"original_width": True, "original_height": 1},
        ),
    ]
    _, rejected, kept = _gate(tmp_path, samples)
    assert rejected == {"small": "width, height", "wide": "aspect", "was_small": "width, height"}
    assert set(kept) == {"junk", "flag"}


# ---- 5: file names that are not UTF-8 ---------------------------------------------------
def test_a_file_name_that_is_not_utf8_is_ingested(tmp_path: Path):
    """Linux file names are bytes: b"caf\\xe9.png" (Latin-1) reaches Python as
    "caf\\udce9.png" (surrogateescape), which neither ``str.encode()`` nor ``quote()``
    take."""
    from training.intake import ingest

    src = tmp_path / "src"
    _folder(src, {f"good{i}": _picture(400 + i, 40) for i in range(3)})
    name = os.fsdecode(b"caf\xe9")
    try:
        _picture(410, 40).save(src / f"{name}.png")
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    (src / f"{name}.txt").write_bytes(b"a picture in a caf\xc3\xa9\n")
    params = _params({"dataset": "folder", "source": str(src)})
    report = ingest.run(params, tmp_path / "raw", tmp_path / "work")
    assert report["count"] == 4 and report["successes"] == 4
    recs = list(shards.read(shards.shard_paths(tmp_path / "raw" / "shards")))
    (cafe,) = [r for r in recs if r.caption == "a picture in a café"]
    assert cafe.meta["url"].endswith("/caf%ED%B3%A9.png") and cafe.meta["original_width"] == 40
    # a re-run finds the same row ids: nothing is fetched again
    again = ingest.run(params, tmp_path / "raw", tmp_path / "work")
    assert again["rows_kept"] == 4 and again["rows_new"] == 0
