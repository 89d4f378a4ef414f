"""``evaluate.ruler``: what may be a ruler is checked before anything is sampled, by the
evaluate stage and by the pipeline's preflight. (The ruler trained, registered and
measured with end to end: tests/test_real_data.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training import config


def _params(ruler: str | None) -> config.Params:
    return config.resolve({"profile": "tiny", "evaluate": {"ruler": ruler}})


def _folder(root: Path, cfg: dict, weights: str = "model.safetensors", tokenizer=True) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(cfg))
    (root / weights).write_bytes(b"")
    if tokenizer:
        (root / "tokenizer_config.json").write_text("{}")
    return root


def test_without_a_ruler_each_run_measures_with_its_own_clip():
    from training.evaluation.ruler import resolve

    assert resolve(_params(None)) is None


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing", "is not a directory"),
        (
            lambda d: _folder(
                d / "vae",
                {"_class_name": "AutoencoderKL", "model_type": None},
                "diffusion_pytorch_model.safetensors",
            ),
            "no model.safetensors and config.json",
        ),
        (
            lambda d: _folder(d / "unet", {"model_type": "unet"}),
            "config.json says model_type 'unet', not 'clip'",
        ),
        (
            lambda d: _folder(
                d / "big", {"model_type": "clip", "vision_config": {"image_size": 64}}
            ),
            "the CLIP sees 64 px images, this run's are 32 px (ingest.image_size)",
        ),
        (
            lambda d: _folder(
                d / "notok",
                {"model_type": "clip", "vision_config": {"image_size": 32}},
                tokenizer=False,
            ),
            "no tokenizer beside the CLIP model",
        ),
    ],
    ids=["missing", "a-vae", "not-a-clip", "other-size", "no-tokenizer"],
)
def test_what_is_not_a_clip_ruler_for_this_profile_is_refused(tmp_path, make, message):
    from training.evaluation.ruler import resolve
    from training.phases.reuse import ReuseError

    ref = str(make(tmp_path))
    with pytest.raises(ReuseError, match="^evaluate.ruler: ") as err:
        resolve(_params(ref))
    assert message in str(err.value)


def test_the_pipeline_stops_before_any_stage_on_a_bad_ruler(tmp_path):
    from flows.pipeline import PreflightFailed, _preflight

    with pytest.raises(PreflightFailed, match="evaluate.ruler: .* is not a directory"):
        _preflight(_params(str(tmp_path / "nowhere")))


def test_a_directory_ruler_is_named_with_its_weights_digest(tmp_path):
    """A directory can be retrained in place (``kiln ruler`` rewrites data/ruler), so
    its path alone does not say which CLIP measured a recorded distance."""
    from training.evaluation.ruler import resolve

    folder = _folder(tmp_path / "r", {"model_type": "clip", "vision_config": {"image_size": 32}})
    (folder / "model.safetensors").write_bytes(b"one")
    first = resolve(_params(str(folder)))
    (folder / "model.safetensors").write_bytes(b"two")
    second = resolve(_params(str(folder)))
    assert first is not None and second is not None
    assert first[1].startswith(f"{folder} (weights sha256 ")
    assert first[1] != second[1]


def test_kiln_ruler_refuses_the_pipelines_own_seed(project: Path):
    """Were: `kiln ruler --seed 0` trained the ruler with the run's CLIP seed, the bend
    the README says a ruler never has; refused in one line before any training."""
    from tests.conftest import kiln

    for split in ("train", "val"):
        (project / "data" / "clean" / split).mkdir(parents=True)
        (project / "data" / "clean" / split / "index.parquet").write_bytes(b"")
    proc = kiln(project, "ruler", "--seed", "0", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "kiln: error: ruler: --seed 0 is the pipeline's seed (params.yaml seed); a ruler "
        "needs its own (the default is 1, or 0 when the pipeline's is 1)"
    )
    assert not (project / "data" / "ruler").exists()
