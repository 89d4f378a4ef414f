"""DESIGN rule 6: a stage's DVC deps are exactly the code its command can import, so an
edit re-runs exactly the stages whose code it changes, and the dvc.yaml stages are the
stage table's."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_project
from tests.layout import ROOT, expand, stage_files
from training.paths import SOURCE
from training.stages import PIPELINE_MODEL, SOURCE_PROBE, STAGES

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _out_names(stage: dict) -> list[str]:
    return [next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]]


def test_dvc_stages_are_the_stage_table():
    """The table's stages, after the source probe that ingest depends on."""
    assert list(DVC_YAML) == [SOURCE_PROBE, *(s.name for s in STAGES)]
    probe = DVC_YAML[SOURCE_PROBE]
    assert probe["cmd"] == f"kiln {SOURCE_PROBE}" and probe["always_changed"] is True
    assert _out_names(probe) == [SOURCE.as_posix()]
    for s in STAGES:
        stage = DVC_YAML[s.name]
        assert stage["cmd"] == f"kiln {s.command}"
        assert _out_names(stage) == [p.as_posix() for p in s.outs], s.name
        first = stage["outs"][0]
        assert s.persist == (
            isinstance(first, dict) and next(iter(first.values())).get("persist", False)
        )
        data = [d for d in stage["deps"] if not d.startswith("training/")]
        probe_out = [SOURCE.as_posix()] if s.name == "ingest" else []
        assert data == probe_out + [p.as_posix() for p in s.inputs], s.name


def test_every_stage_tracks_its_own_profile_section():
    """profiles.yaml's header: each stage depends on its own section of the chosen
    profile (validate tracked only ingest's, so a key added to validate's never made it
    stale)."""
    for s in STAGES:
        tracked = next(p for p in DVC_YAML[s.name]["params"] if isinstance(p, dict))
        assert f"${{profile}}.{s.name}" in tracked["training/profiles.yaml"], s.name


@pytest.mark.parametrize("spec", STAGES, ids=lambda s: s.name)
def test_every_stage_lists_exactly_the_code_it_imports(spec):
    deps = [d for d in DVC_YAML[spec.name]["deps"] if d.startswith("training/")]
    listed = expand(deps)
    needed = stage_files(spec.phase, spec.model == PIPELINE_MODEL)
    assert listed >= needed, f"{spec.name}: dvc.yaml deps lack {sorted(needed - listed)}"
    assert listed <= needed, (
        f"{spec.name}: dvc.yaml deps it never imports: {sorted(listed - needed)}"
    )


def _dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    dvc = Path(sys.executable).with_name("dvc")
    return subprocess.run(
        [str(dvc), *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=True
    )


@pytest.fixture(scope="module")
def locked_copy(tmp_path_factory) -> Path:
    """The repository's code in a scratch copy, with every stage locked as if it had
    just run (placeholder outputs: dvc status compares deps and params, not content)."""
    dest = copy_project(tmp_path_factory.mktemp("stale"))
    for s in STAGES:
        for out in s.outs:
            (dest / out).mkdir(parents=True, exist_ok=True)
            (dest / out / "placeholder").write_text(s.name)
        (dest / "data" / "metrics").mkdir(parents=True, exist_ok=True)
        (dest / "data" / "metrics" / f"{s.name}.json").write_text("{}")
    (dest / SOURCE).write_text("{}")
    _dvc(dest, "config", "--local", "core.no_scm", "true")
    _dvc(dest, "commit", "--force", "--quiet")
    assert _stale(dest) == set()
    return dest


def _stale(root: Path) -> set[str]:
    """The stages dvc status marks stale, but the source probe, which always runs."""
    out = json.loads(_dvc(root, "status", "--json").stdout or "{}")
    assert out.pop(SOURCE_PROBE, ["always changed"]) == ["always changed"]
    return set(out)


DOWNSTREAM = {
    "train_vae", "train_clip", "precompute_latents", "train_unet", "train_controlnet", "evaluate"
}  # fmt: skip
# (file edited, stages dvc status must mark stale: exactly these)
EDITS = [
    ("training/engine/ema.py", DOWNSTREAM),
    ("training/engine/loop.py", DOWNSTREAM),
    ("training/inference/sampling.py", {"train_unet", "train_controlnet", "evaluate"}),
    ("training/inference/text2image_model.py", {"evaluate"}),
    ("training/cli/user.py", set()),
    ("training/cli/interrupt.py", set()),
    ("training/intake/guard.py", {"ingest"}),
    ("training/intake/kinds/folder.py", {"ingest"}),
    ("training/intake/sync.py", {"ingest"}),
    ("training/intake/checks.py", {"validate"}),
    ("training/intake/shards.py", {s.name for s in STAGES}),
    ("training/phases/vae.py", {"train_vae"}),
    ("training/phases/unet.py", {"train_unet", "train_controlnet"}),  # its training step
    ("training/phases/controlnet.py", {"train_controlnet"}),
    # the detector: the ControlNet learns from it, the served model reads controls with it
    ("training/inference/control.py", {"train_controlnet", "evaluate"}),
    # what the denoiser is, and which text states its pipeline feeds it
    (
        "training/backbones/unet2d.py",
        {"precompute_latents", "train_unet", "train_controlnet", "evaluate"},
    ),
    ("training/evaluation/figures.py", {"train_controlnet", "evaluate"}),
    ("training/evaluation/heldout.py", {"train_unet", "train_controlnet", "evaluate"}),
    # via evaluation/figures.py, which train_controlnet's report uses
    ("training/evaluation/metrics/distribution.py", {"train_controlnet", "evaluate"}),
    ("training/tracking/registry.py", {s.name for s in STAGES}),
]


@pytest.mark.parametrize("path,expected", EDITS, ids=[e[0] for e in EDITS])
def test_an_edit_makes_exactly_its_stages_stale(locked_copy, path, expected):
    f = locked_copy / path
    before = f.read_text()
    try:
        f.write_text(before + "\n# an edit\n")
        assert _stale(locked_copy) == expected
    finally:
        f.write_text(before)


def test_a_unet_size_change_restales_only_train_unet(locked_copy):
    f = locked_copy / "training" / "profiles.yaml"
    before = f.read_text()
    try:
        at = before.index("  train_unet:")  # tiny's U-Net section, the first
        f.write_text(before[:at] + before[at:].replace("    steps: 1800\n", "    steps: 1900\n", 1))
        assert f.read_text() != before
        assert _stale(locked_copy) == {"train_unet"}  # evaluate follows once it re-ran
        # another profile's sizes are not this run's
        f.write_text(before.replace("    steps: 50000\n", "    steps: 60000\n", 1))
        assert _stale(locked_copy) == set()
    finally:
        f.write_text(before)


def test_dvc_sees_the_code_not_the_bytecode(locked_copy):
    cache = locked_copy / "training" / "engine" / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "ema.cpython-311.pyc").write_bytes(os.urandom(64))
    try:
        assert _stale(locked_copy) == set()
    finally:
        shutil.rmtree(cache)


def test_upstream_stages_from_dvc_yaml_with_persistent_outs():
    """A GPU worker pulls the outs of a stage's upstream stages (flows/stage.py). The
    bug: an out written as a mapping (`- data/raw: {persist: true}`) crashed the lookup,
    and every remote stage with it."""
    from flows.stage import upstream

    assert upstream("ingest") == [SOURCE_PROBE]
    assert upstream("validate") == ["ingest"]
    assert upstream("precompute_latents") == ["validate", "train_vae", "train_clip"]
