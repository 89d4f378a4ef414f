"""What validate writes beside the clean data stays out of ``data/clean``'s DVC hash.

Every training stage depends on ``data/clean``. The rejects table, the report and the
run's resolved config used to be written inside it, so one more picture that the gate
rejects (a truncated PNG), or a validate setting that changes no sample, left
``train/`` and ``val/`` byte for byte as they were but changed the folder's hash: DVC
re-ran train_vae, train_clip, precompute_latents, train_controlnet and evaluate (hours
on real data), and each registered a new version with the very weights it had before.
They now live in ``data/validation``, a separate out of validate that no stage reads.

Real DVC in a project copy: source, ingest and validate run; the training stages are
only locked (placeholder outs, as in test_dvc_deps.py), since ``dvc status`` compares
their deps, not what they made.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from tests.conftest import copy_project
from training import config
from training import paths as P
from training.stages import SOURCE_PROBE, STAGES

TRAINING = {s.name for s in STAGES} - {"ingest", "validate"}


def _png(i: int) -> bytes:
    rng = np.random.default_rng(700 + i)  # 4x4 noise, enlarged: no two are near copies
    img = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((40, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``dvc ARGS`` in the copy, whose stages run the copy's own code."""
    dvc = Path(sys.executable).with_name("dvc")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(cwd),
    }
    proc = subprocess.run(
        [str(dvc), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _stale(root: Path) -> set[str]:
    """The stages ``dvc status`` marks stale, but the source probe, which always runs."""
    out = json.loads(_dvc(root, "status", "--json").stdout or "{}")
    out.pop(SOURCE_PROBE, None)
    return set(out)


def _locked(root: Path, stage: str) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"][stage]
    return {o["path"]: o["md5"] for o in lock["outs"]}


def test_a_rejected_picture_or_a_data_neutral_setting_retrains_nothing(tmp_path: Path):
    project = copy_project(tmp_path / "kiln")
    src = tmp_path / "pictures"
    src.mkdir()
    for i in range(12):
        (src / f"p{i}.png").write_bytes(_png(i))
        (src / f"p{i}.txt").write_text(f"picture {i}")
    config.set_values(
        project / "params.yaml",
        {
            "ingest.dataset": "folder",
            "ingest.source": str(src),
            "ingest.processes": 1,
            "validate.val_fraction": 0.3,
        },
    )
    _dvc(project, "repro", "validate")
    clean = project / P.CLEAN
    assert sorted(p.name for p in clean.iterdir()) == ["train", "val"]  # the data only
    for s in STAGES:  # the training stages locked as if they had run on this data
        if s.name in TRAINING:
            for out in s.outs:
                (project / out).mkdir(parents=True, exist_ok=True)
                (project / out / "placeholder").write_text(s.name)
            (project / P.METRICS / f"{s.name}.json").write_text("{}")
    _dvc(project, "commit", "--force", "--quiet")
    assert _stale(project) == set()
    before = _locked(project, "validate")

    # a picture the gate turns away: cut short mid-file
    (src / "broken.png").write_bytes(_png(99)[:60])
    (src / "broken.txt").write_text("a broken picture")
    rerun = _dvc(project, "repro", "validate")
    assert "Running stage 'validate'" in rerun.stdout
    rejects = pd.read_parquet(project / P.VALIDATION / "rejects.parquet")
    assert any(rejects.url.str.endswith("/broken.png")), rejects
    report = json.loads((project / P.VALIDATION / "report.json").read_text())
    kept, turned_away = (
        report["train"] + report["val"],
        report["rejected"] + report["ingest_rejected"],
    )
    assert (kept, turned_away) == (12, 1)
    after = _locked(project, "validate")
    assert after[P.CLEAN.as_posix()] == before[P.CLEAN.as_posix()]
    assert after[P.VALIDATION.as_posix()] != before[P.VALIDATION.as_posix()]
    assert _stale(project) == set()  # was: every training stage

    # a validate setting that changes no sample: the resolved config it records moved
    # out of data/clean with the report
    config.set_values(project / "params.yaml", {"validate.chunk_rows": 500})
    again = _dvc(project, "repro", "validate")
    assert "Running stage 'validate'" in again.stdout
    assert _locked(project, "validate")[P.CLEAN.as_posix()] == before[P.CLEAN.as_posix()]
    assert _stale(project) == set()
