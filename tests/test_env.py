"""The two dependency traps found when this stack was first co-installed."""

import importlib.metadata as md
import subprocess
import sys
import sysconfig
from pathlib import Path

from training import doctor


def test_doctor_reports_healthy_environment():
    assert doctor.problems() == []


def test_no_dataclasses_backport_shadowing_stdlib():
    # img2dataset depends on the Python-3.6 backport; the install must remove it.
    try:
        md.distribution("dataclasses")
        installed = True
    except md.PackageNotFoundError:
        installed = False
    assert not installed, "the 'dataclasses' backport is installed"
    # What a fresh interpreter (like Prefect's server subprocess) really imports:
    out = subprocess.run(
        [sys.executable, "-c", "import dataclasses; print(dataclasses.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(out).parent == Path(sysconfig.get_paths()["stdlib"])


def test_doctor_detects_the_backport(monkeypatch):
    real = md.distribution

    def fake(name):
        if name == "dataclasses":
            return object()
        return real(name)

    monkeypatch.setattr(doctor.md, "distribution", fake)
    assert any("dataclasses" in p for p in doctor.problems())


def test_doctor_detects_fastapi_too_new_for_prefect(monkeypatch):
    versions = {"prefect": "3.8.8", "fastapi": "0.151.0"}
    monkeypatch.setattr(doctor.md, "version", lambda name: versions[name])
    assert any("fastapi" in p for p in doctor.problems())
    versions["prefect"] = "3.9.1"
    assert not any("fastapi" in p for p in doctor.problems())


def test_prefect_api_app_builds():
    # Building Prefect's FastAPI app is where fastapi>=0.151 fails (Body(min_items=...)).
    from prefect.server.api.server import create_app

    app = create_app(ephemeral=True)
    assert app is not None
