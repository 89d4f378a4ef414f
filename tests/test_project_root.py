"""Kiln started anywhere but the project root (README, "Where outputs go"): one line
saying so before anything is created. Real ``python -m training.cli`` processes, as the
``kiln`` script runs them, in a project of params.yaml and dvc.yaml."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import REPO
from tests.test_ingest_bad_input import _kiln


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_command_started_in_a_subfolder_of_the_project_is_refused_creating_nothing(
    tmp_path: Path,
):
    """Was: from data/, ``kiln run --dataset shapes`` made data/.kiln and said "cannot
    start the run: [Errno 2] No such file or directory: 'params.yaml'"; ``kiln ingest``
    made data/.kiln too before its "no such params file"."""
    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy2(REPO / name, root / name)
    before = _tree(root)
    params = (root / "params.yaml").read_text()
    for args in (["run", "--dataset", "shapes"], ["ingest"], ["generate", "x", "--model", ".."]):
        proc = _kiln(args, root / "data")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.splitlines() == [
            f"kiln: error: {root / 'data'} is inside the Kiln project {root}: run kiln from "
            f"the repository root (cd {root}); nothing was done"
        ], args
    assert _tree(root) == before  # no data/.kiln, no data/samples
    assert (root / "params.yaml").read_text() == params
    helped = _kiln(["ingest", "--help"], root / "data")  # help reads nothing: it still runs
    assert helped.returncode == 0 and "Stage 1" in helped.stdout, helped.stderr[-3000:]


def test_a_project_command_outside_any_project_is_refused_creating_nothing(tmp_path: Path):
    """Was: ``kiln run`` in a folder with no project made .kiln/ there, and said
    "cannot start the run: [Errno 2] No such file or directory: 'params.yaml'"."""
    for args in (["run", "--dataset", "shapes"], ["ingest"], ["train-vae"]):
        proc = _kiln(args, tmp_path)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.splitlines() == [
            f"kiln: error: no params.yaml in {tmp_path}: run kiln {args[0]} from the "
            "repository root (the folder with params.yaml and dvc.yaml); nothing was done"
        ]
    assert list(tmp_path.iterdir()) == []
