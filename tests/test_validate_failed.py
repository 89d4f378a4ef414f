"""A validate that fails for want of clean images leaves the user the reasons.

The bug: with every picture rejected, ``kiln validate`` said "no image passed the
quality gate; see rejects.parquet for why", and the failed stage removed its outputs,
that rejects table with them: the user was sent to a file that was gone. The report and
rejects now stay in ``.kiln/validate-failed/``, and the error names that path.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image

from tests.conftest import copy_project, kiln
from training import config


def test_no_clean_image_names_a_rejects_table_that_exists(tmp_path: Path):
    project = copy_project(tmp_path / "kiln")
    folder = tmp_path / "tiny"
    folder.mkdir()
    for i, colour in enumerate(("red", "green", "blue")):  # 4 px: under validate.min_side
        Image.new("RGB", (4, 4), colour).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {colour} square")
    config.set_values(
        project / "params.yaml", {"ingest.dataset": "folder", "ingest.source": str(folder)}
    )
    kiln(project, "ingest")
    proc = kiln(project, "validate", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("kiln: error:")]
    assert "no image passed the quality gate" in line, line
    named = line.split("see ", 1)[1].split(" for why")[0]
    rejects = pd.read_parquet(project / named)  # the file the error names is there
    assert len(rejects) == 3 and set(rejects["stage"]) == {"validate"}
    assert all("width" in checks for checks in rejects["failed_checks"]), rejects
    assert (project / named).with_name("report.json").is_file()
    assert not (project / "data" / "validation").exists()  # the stage's outs are still removed
    # the Data Docs it pointed at are kept too (were: named, then removed with the outs)
    (docs,) = [x for x in proc.stderr.splitlines() if "Great Expectations Data Docs:" in x]
    assert (project / docs.split("Data Docs: ", 1)[1]).is_file(), docs
    assert "per aspect-ratio bucket: \n" not in proc.stderr + "\n"  # no empty list
