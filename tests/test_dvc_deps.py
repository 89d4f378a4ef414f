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
from training.stages import PIPELINE_MODEL, STAGES

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_dvc_stages_are_the_stage_table():
    assert list(DVC_YAML) == [s.name for s in STAGES]
    for s in STAGES:
        stage = DVC_YAML[s.name]
        assert stage["cmd"] == f"kiln {s.command}"
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]]
        assert outs == [p.as_posix() for p in s.outs], s.name
        data = [d for d in stage["deps"] if not d.startswith("training/")]
        assert data == [p.as_posix() for p in s.inputs], s.name


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
    _dvc(dest, "config", "--local", "core.no_scm", "true")
    _dvc(dest, "commit", "--force", "--quiet")
    assert _stale(dest) == set()
    return dest


def _stale(root: Path) -> set[str]:
    out = _dvc(root, "status", "--json").stdout
    return set(json.loads(out or "{}"))


DOWNSTREAM = {"train_vae", "train_clip", "precompute_latents", "train_unet", "evaluate"}
# (file edited, stages dvc status must mark stale: exactly these)
EDITS = [
    ("training/engine/ema.py", DOWNSTREAM),
    ("training/engine/loop.py", DOWNSTREAM),
    ("training/inference/sampling.py", {"train_unet", "evaluate"}),
    ("training/inference/text2image_model.py", {"evaluate"}),
    ("training/cli/user.py", set()),
    ("training/cli/interrupt.py", set()),
    ("training/intake/guard.py", {"ingest"}),
    ("training/intake/kinds/folder.py", {"ingest"}),
    ("training/intake/checks.py", {"validate"}),
    ("training/intake/shards.py", {s.name for s in STAGES}),
    ("training/phases/vae.py", {"train_vae"}),
    ("training/phases/unet.py", {"train_unet"}),
    ("training/phases/backbones/unet2d.py", {"train_unet"}),
    ("training/evaluation/figures.py", {"evaluate"}),
    ("training/evaluation/heldout.py", {"train_unet", "evaluate"}),
    ("training/evaluation/metrics/distribution.py", {"evaluate"}),
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
