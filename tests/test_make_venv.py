"""`make`'s venv is on a Python that pyproject.toml's requires-python allows. Was: with no
python3.11 it fell back to any `python3` (3.12 on newer systems), `pip install -e .`
then refused that venv, and `test -x .venv/bin/python` kept it even after Python 3.11
was installed. Run against fake interpreters that only say their version (and log how
they were called), so nothing is created or installed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import REPO

REQUIRES = re.search(
    r'^requires-python\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M
).group(1)


def _fake_python(path: Path, version: str, log: Path) -> Path:
    """An "interpreter" that prints `version` for the version query and logs its args."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'#!/bin/sh\necho "$0 $*" >> "{log}"\nif [ "$1" = -c ]; then echo {version}; fi\n'
    )
    path.chmod(0o755)
    return path


def _make(*args: str, path_first: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    if path_first is not None:
        env["PATH"] = f"{path_first}{os.pathsep}{env['PATH']}"
    return subprocess.run(
        ["make", "--no-print-directory", *args], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip


def test_a_venv_on_a_python_pyproject_does_not_allow_is_refused(tmp_path):
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    _fake_python(venv / "bin" / "python", "3.12.3", log)
    _fake_python(venv / "bin" / "pip", "0", log)
    for stamp in (False, True):  # also when its install stamp is fresh
        if stamp:
            (venv / ".installed").touch()
        proc = _make("install", f"VENV={venv}")
        assert proc.returncode != 0, proc.stdout
        assert f"{venv} runs Python 3.12.3" in proc.stderr, proc.stderr
        assert f"requires-python is '{REQUIRES}'" in proc.stderr
        assert f"rm -rf {venv}" in proc.stderr  # what to do about it
        assert "/pip " not in log.read_text(), "installed into the wrong venv"
    assert (venv / "bin" / "python").exists()  # refused, not deleted


def test_no_allowed_python_is_refused_before_a_venv_is_made(tmp_path):
    """No python3.11, and python3 is 3.12: was `python3 -m venv`, then pip's refusal."""
    log, venv = tmp_path / "calls.log", tmp_path / "venv"
    python = _fake_python(tmp_path / "bin" / "python3.12", "3.12.3", log)
    _fake_python(tmp_path / "bin" / "python3", "3.12.3", log)
    proc = _make("install", f"VENV={venv}", f"PYTHON={python}", path_first=tmp_path / "bin")
    assert proc.returncode != 0
    assert f"no Python that pyproject.toml allows (requires-python '{REQUIRES}')" in proc.stderr
    assert f"{python}: Python 3.12.3; python3: Python 3.12.3;" in proc.stderr, proc.stderr
    assert "-m venv" not in log.read_text() and not venv.exists()
    missing = _make("venv", f"VENV={venv}", "PYTHON=no-such-python3.11",
                    path_first=tmp_path / "bin")  # fmt: skip
    assert missing.returncode != 0 and "no-such-python3.11: not found;" in missing.stderr


def test_the_venv_is_made_with_the_first_python_that_fits(tmp_path):
    log, venv = tmp_path / "calls.log", tmp_path / "venv"
    _fake_python(tmp_path / "bin" / "python3", "3.11.4", log)
    # python3.11 missing: python3 is used, because it is a 3.11
    proc = _make("venv", f"VENV={venv}", "PYTHON=no-such-python3.11", path_first=tmp_path / "bin")
    assert proc.returncode == 0, proc.stderr
    assert f"python3 -m venv {venv}" in log.read_text()
    # PYTHON fits: it is the one used
    log.unlink()
    python = _fake_python(tmp_path / "other" / "python3.11", "3.11.9", log)
    proc = _make("venv", f"VENV={venv}", f"PYTHON={python}", path_first=tmp_path / "bin")
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines()[-1] == f"{python} -m venv {venv}"


def test_a_venv_on_an_allowed_python_is_kept(tmp_path):
    """The real interpreter (this venv's, a 3.11 like CI's python3.11) passes the check,
    and an existing venv on it is used as it is."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    proc = _make("venv", f"VENV={venv}")
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr
    assert sorted(p.name for p in venv.iterdir()) == ["bin"]
    real = shutil.which("python3.11")
    if real:  # the Makefile's default PYTHON, as `.ci/run` (make test) finds it here
        (venv / "bin" / "python").unlink()
        (venv / "bin" / "python").symlink_to(real)
        assert _make("venv", f"VENV={venv}").returncode == 0


def test_requires_python_clauses(tmp_path):
    """The check reads requires-python's clauses as pip does (PEP 440's release parts)."""
    cases = {
        ">=3.11,<3.12": {"3.11.0": True, "3.11.9": True, "3.12.0": False, "3.10.14": False},
        ">=3.10, !=3.11.*": {"3.10.1": True, "3.11.2": False, "3.12.1": True},
        "~=3.11": {"3.11.2": True, "3.12.0": True, "3.10.0": False, "4.0.0": False},
        "~=3.11.1": {"3.11.1": True, "3.11.9": True, "3.12.0": False, "3.11.0": False},
        "==3.11.*": {"3.11.7": True, "3.12.0": False},
        ">3.11.2,<=3.12": {"3.11.2": False, "3.11.3": True, "3.12.0": True, "3.12.1": False},
        "": {"3.9.0": True},
    }
    log = tmp_path / "calls.log"
    for spec, versions in cases.items():
        for version, fits in versions.items():
            venv = tmp_path / f"v{version}"
            _fake_python(venv / "bin" / "python", version, log)
            proc = _make("venv", f"VENV={venv}", f"REQUIRES_PYTHON={spec}")
            assert (proc.returncode == 0) is fits, (spec, version, proc.stderr)


def test_ci_and_make_test_still_build_the_venv_first():
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)
    dry = _make("-n", "-B", "test", "VENV=/nonexistent/venv").stdout
    assert dry.index("-m venv") < dry.index('pip install --quiet "torch==2.13.0"')
    assert dry.index("pip install --quiet") < dry.index("-m pytest")
