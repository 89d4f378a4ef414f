"""Bad input through the whole `kiln run` (Prefect flow over DVC stages): the stage's
one-line error, said once. A failure that cannot pass on retry is not retried (a missing
folder printed its error three times), and messages carry the stage name once."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from training import config

from .conftest import kiln

pytestmark = pytest.mark.e2e


def _errors(proc) -> list[str]:
    return [x for x in proc.stderr.splitlines() if x.startswith("kiln: error:")]


def test_missing_source_folder_fails_once_without_retries(project: Path, tmp_path: Path):
    missing = tmp_path / "no-such-folder"
    config.set_values(project / "params.yaml", {"ingest.source": str(missing)})
    proc = kiln(project, "run", "--dataset", "folder", check=False, timeout=900)
    assert proc.returncode == 1
    said = [x for x in _errors(proc) if str(missing) in x]
    assert len(said) == 1, proc.stderr[-4000:]  # once: the flow did not retry it
    assert said[0].startswith("kiln: error: ingest: ") and "ingest: ingest:" not in said[0]
    assert "Traceback" not in proc.stderr


def test_empty_val_split_fails_at_validate_with_advice(project: Path, tmp_path: Path):
    """Three images and a val_fraction that sends none of them to val: the old message
    was `validate: validate: an empty split is unusable ({...dict...})`."""
    folder = tmp_path / "three"
    folder.mkdir()
    for i, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {colour} square")
    config.set_values(
        project / "params.yaml", {"ingest.source": str(folder), "validate.val_fraction": 0.001}
    )
    proc = kiln(project, "run", "--dataset", "folder", check=False, timeout=900)
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = [x for x in _errors(proc) if x.startswith("kiln: error: validate")]
    assert "validate: validate" not in line and "{" not in line, line
    assert "val_fraction" in line, line  # says how to fix it
    assert not (project / "data" / "models").exists()  # nothing trained
