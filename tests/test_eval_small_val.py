"""A val split too small for the evaluation is caught where it is made (validate, before
any training), said in words with what to change; what the evaluation can still do with
a small one, it does, and records why it skipped the rest."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import config
from training.evaluation.metrics import distribution
from training.intake import shards, split, validate


def _params(val_fraction: float = 0.05) -> config.Params:
    return config.resolve(
        {
            "ingest": {"dataset": "folder", "source": "unused"},
            "validate": {"samples_per_shard": 20, "val_fraction": val_fraction},
        }
    )


def _png(i: int) -> bytes:
    rng = np.random.default_rng(7000 + i)
    img = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((24, 24))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _names(n: int, n_val: int, fraction: float = 0.05) -> list[str]:
    """``n`` file names of which exactly ``n_val`` fall in val at ``fraction``."""
    val, train = [], []
    i = 0
    while len(val) < n_val or len(train) < n - n_val:
        name = f"/img{i}.png"
        (val if split.in_val(name, fraction) else train).append(name)
        i += 1
    return val[:n_val] + train[: n - n_val]


def _raw(tmp_path: Path, names: list[str]) -> Path:
    raw = tmp_path / "raw"
    with shards.ShardWriter(raw / "shards", "raw", 50) as w:
        for i, name in enumerate(names):
            rec = shards.Record(
                f"{i:04d}", _png(i), "png", f"photo {i}", {"url": f"kiln://f{name}"}
            )
            w.write(rec)
    return raw


def test_no_val_image_is_a_clear_error_with_a_fraction_that_works(tmp_path: Path):
    raw = _raw(tmp_path, _names(3, 0))
    with pytest.raises(split.SplitError) as err:
        validate.run(_params(), raw, tmp_path / "clean")
    msg = str(err.value)
    assert msg.startswith("0 of 3 clean images went to val"), msg
    assert "validate:" not in msg and "{" not in msg and "\n" not in msg
    assert "validate.val_fraction is 0.05" in msg and "add images" in msg
    fraction = float(msg.split("raise validate.val_fraction to ")[1].split()[0])
    report = validate.run(_params(fraction), raw, tmp_path / "clean2")  # the advice works
    assert report["val"] >= split.MIN_VAL and report["train"] >= 1


def test_no_train_image_is_a_clear_error(tmp_path: Path):
    raw = _raw(tmp_path, _names(2, 2, 0.9))
    with pytest.raises(split.SplitError, match=r"^0 of 2 clean images went to train .*lower"):
        validate.run(_params(0.9), raw, tmp_path / "clean")


def test_a_val_split_too_small_for_fd_passes_with_a_warning(tmp_path: Path):
    raw = _raw(tmp_path, _names(20, 2))
    report = validate.run(_params(), raw, tmp_path / "clean")
    assert report["val"] == 2 and report["train"] == 18
    assert "evaluate will skip fd_clip and cmmd_clip" in report["warning"]
    fraction = float(report["warning"].split("raise validate.val_fraction to ")[1].split()[0])
    assert validate.run(_params(fraction), raw, tmp_path / "clean2")["val"] >= 4


def test_validate_knows_what_the_distribution_metrics_need():
    assert split.MIN_VAL_FOR_DISTRIBUTION == 2 * distribution.MIN_SAMPLES


def _emb(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 16))


@pytest.mark.parametrize("metric", [distribution.frechet_distance, distribution.cmmd])
def test_fd_and_cmmd_refuse_too_few_samples_clearly(metric):
    with pytest.raises(ValueError, match="needs at least 2 embeddings per set, got 1 and 5"):
        metric(_emb(1), _emb(5, 1))
    assert np.isfinite(metric(_emb(2), _emb(2, 1)))


def test_distribution_metrics_are_skipped_with_a_reason_on_a_tiny_val_split():
    out = distribution.distribution_metrics(_emb(8), _emb(2, 1))  # halves of one image
    assert "fd_clip" not in out and "cmmd_clip" not in out
    assert out["fd_clip_skipped"].startswith("needs >= 2 val images per half (4 in all)")
    assert "have 2 val images" in out["fd_clip_skipped"]
    assert set(out) == {
        "fd_clip_skipped",
        "cmmd_clip_skipped",
        "fd_clip_real_halves_skipped",
        "cmmd_clip_real_halves_skipped",
        "fd_clip_ratio_skipped",  # the user-data gate's metric: the gate reads the reason
    }
    full = distribution.distribution_metrics(_emb(8), _emb(4, 1))
    assert full["fd_samples"] == 2 and np.isfinite(full["fd_clip"])
    assert not any(k.endswith("_skipped") for k in full)
