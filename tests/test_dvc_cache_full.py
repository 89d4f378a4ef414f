"""A stage that finished while DVC's cache had no room for its outputs: the flow stops
with one line saying so and how to keep the work, and runs nothing again
(``flows/dvc_cache.py``). Real DVC on a real tmpfs cache (root and mount(8); skipped
otherwise); the stages are two-line commands that write what Kiln's would."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from flows import dvc_cache, tasks
from tests.conftest import tmpfs

DVC = str(Path(sys.executable).with_name("dvc"))
# a stage's command: its output folder of SIZE random bytes and its metrics of METRIC
# bytes (a stage with deps: DVC's run cache stores those too), and a count of its runs
WRITE = """import os, pathlib, sys
folder, stage, size, metric = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
pathlib.Path(folder).mkdir(parents=True)
pathlib.Path(folder, "weights.bin").write_bytes(os.urandom(size))
pathlib.Path("data/metrics").mkdir(parents=True, exist_ok=True)
pathlib.Path("data/metrics", stage + ".json").write_text('{"x": "' + "x" * metric + '"}')
pathlib.Path("runs").mkdir(exist_ok=True)
with open(pathlib.Path("runs", stage), "a") as runs:
    runs.write("x")
"""
STAGE = """  {name}:
    cmd: {python} write.py data/models/{folder} {name} {size} {metric}
    deps:
      - write.py
    outs:
      - data/models/{folder}
    metrics:
      - data/metrics/{name}.json:
          cache: false
"""
# a model folder DVC cannot store (it exits 0), and metrics its run cache cannot (255)
SIZES = {"train_vae": ("vae", 600_000, 2), "train_clip": ("clip", 2_000, 600_000)}


@pytest.fixture
def project(tmp_path: Path, monkeypatch):
    root = tmp_path / "p"
    root.mkdir()
    (root / "write.py").write_text(WRITE)
    stages = "".join(
        STAGE.format(name=n, folder=f, python=sys.executable, size=size, metric=metric)
        for n, (f, size, metric) in SIZES.items()
    )
    (root / "dvc.yaml").write_text("stages:\n" + stages)
    for cmd in (
        ["git", "init", "-q"],
        [DVC, "init", "-q"],
        [DVC, "config", "core.analytics", "false"],
    ):
        subprocess.run(cmd, cwd=root, check=True)
    monkeypatch.setattr(tasks, "ROOT", root)
    monkeypatch.setattr(tasks, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.chdir(root)
    with tmpfs(root / ".dvc" / "cache", "256k"):
        try:
            yield root
        finally:
            dvc_cache.cache_dir.cache_clear()


@pytest.mark.parametrize("stage", ["train_vae", "train_clip"])
def test_a_stage_whose_outputs_dvc_cannot_store_stops_the_flow_once(project, stage):
    with pytest.raises(tasks.StageFailed) as info:
        tasks._run_dvc_stage(stage)
    failed = info.value
    assert failed.retry is False  # was: retried, the whole stage run again for nothing
    assert f"stage {stage} finished, but DVC could not store" in str(failed)
    assert f"dvc commit -f {stage}" in str(failed) and "free on" in str(failed)
    assert (project / "runs" / stage).read_text() == "x"  # the stage ran once
    assert (project / "data" / "models" / stage.split("_")[1] / "weights.bin").is_file()
