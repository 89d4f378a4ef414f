"""Shared fixtures. Tests that run the pipeline work on a fresh copy of the repository
(its git-tracked and not-ignored files), never in the checkout itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def project_env(project: Path) -> dict[str, str]:
    """Environment for commands run in a project copy: its own MLflow DB (the default
    sqlite file in the project root), its own Prefect home, the venv's bin on PATH."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "KILN_"))
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PREFECT_HOME"] = str(project / ".prefect")
    env["PYTHONUNBUFFERED"] = "1"
    # the copy's own code: the venv's editable install would otherwise import the
    # checkout's training/ (and DVC would hash one tree while another ran)
    env["PYTHONPATH"] = str(project)
    return env


def copy_project(dest: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"],
    ):
        subprocess.run(cmd, cwd=dest, check=True)
    return dest


def kiln(
    project: Path, *args: str, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / "kiln"), *args],
        cwd=project,
        env=project_env(project),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"kiln {' '.join(args)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_project(tmp_path / "kiln")
