"""Incremental ingestion (#16): a source that gained rows is synced, not fetched again.

A URL list served by a counting loopback server, and a folder: re-ingesting after the
source changed fetches only the new rows (the server sees each kept image once), drops
the removed ones, retries the ones that failed, keeps the rest byte for byte (and in
their train/val split), and starts over when the fetch settings change. Through DVC,
the ``source`` probe makes ``dvc repro`` re-run ingest exactly when the folder changed.
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
import pytest
from PIL import Image

from tests.conftest import CountingImages, copy_project, counting_server
from training import config
from training.intake import ingest, shards, split, validate

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(900 + i)
    img = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((36, 36))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture()
def server():
    with counting_server({f"/{i}.jpg": _jpeg(i) for i in range(40)}) as url:
        yield url


def _params(**ingest_cfg) -> config.Params:
    return config.resolve(
        {
            "ingest": {
                "processes": 1,
                "threads": 4,
                "samples_per_shard": 10,
                "retries": 0,
                "allow_networks": ["127.0.0.1/32"],
                **ingest_cfg,
            },
            "validate": {"val_fraction": 0.3, "samples_per_shard": 50},
        }
    )


def _write_list(path: Path, base: str, rows: list[int], missing: tuple[int, ...] = ()) -> None:
    urls = [f"{base}/{i}.jpg" for i in rows] + [f"{base}/gone-{i}.jpg" for i in missing]
    caps = [f"picture {i}" for i in rows] + [f"gone {i}" for i in missing]
    pd.DataFrame({"url": urls, "caption": caps}).to_parquet(path)


def _samples(raw: Path) -> dict[str, str]:
    """caption -> key of every sample in raw/shards."""
    return {r.caption: r.key for r in shards.read(shards.shard_paths(raw / "shards"))}


def _files(raw: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in (raw / "shards").iterdir()}


def test_url_list_sync_fetches_only_what_the_source_gained(tmp_path: Path, server: str):
    raw, work, lst = tmp_path / "raw", tmp_path / "work", tmp_path / "list.parquet"
    params = _params(dataset="url-list", source=str(lst))

    _write_list(lst, server, list(range(20)))
    first = ingest.run(params, raw, work)
    assert first["successes"] == 20 and first["rows_full_reason"] == "first ingest"
    assert all(CountingImages.hits[f"/{i}.jpg"] == 1 for i in range(20))
    before_files, before = _files(raw), _samples(raw)
    clean1 = tmp_path / "clean1"
    validate.run(params, raw, clean1)

    # rows 0-4 leave the list, 20-29 join it, and one row points at nothing
    _write_list(lst, server, list(range(5, 30)), missing=(1,))
    second = ingest.run(params, raw, work)
    assert (second["rows_new"], second["rows_kept"], second["rows_removed"]) == (11, 15, 5)
    assert second["rows_retried"] == 0
    assert all(CountingImages.hits[f"/{i}.jpg"] == 1 for i in range(30))  # none fetched twice
    after = _samples(raw)
    assert sorted(after) == sorted(f"picture {i}" for i in range(5, 30))
    assert all(after[c] == before[c] for c in after if c in before)  # kept keys stay
    assert len(set(after.values())) == len(after)  # new keys never collide with kept ones
    rejects = pd.read_parquet(raw / "rejects.parquet")
    assert list(rejects.caption) == ["gone 1"]
    assert second["successes"] == 25 and second["rejected"] == 1
    # a shard whose rows all stayed is the same file; one that lost rows was rewritten
    after_files = _files(raw)
    untouched = [n for n in ("00001.tar", "00001.parquet") if n in after_files]
    assert untouched and all(after_files[n] == before_files[n] for n in untouched)
    assert after_files["00000.tar"][1] != before_files["00000.tar"][1]

    # kept samples keep their train/val split
    clean2 = tmp_path / "clean2"
    validate.run(params, raw, clean2)

    def split_of(clean: Path) -> dict[str, str]:
        return {
            r.caption: split
            for split in ("train", "val")
            for r in shards.read(shards.shard_paths(clean / split))
        }

    s1, s2 = split_of(clean1), split_of(clean2)
    assert all(s2[c] == s1[c] for c in s2 if c in s1) and len(s2) == 25

    # the source did not change: nothing is fetched but the row that failed
    third = ingest.run(params, raw, work)
    assert (third["rows_new"], third["rows_retried"], third["rows_kept"]) == (0, 1, 25)
    assert CountingImages.hits["/gone-1.jpg"] == 2
    assert all(CountingImages.hits[f"/{i}.jpg"] == 1 for i in range(30))

    # fetch settings changed: every row is fetched again, at the new size
    resized = ingest.run(_params(dataset="url-list", source=str(lst), image_size=48), raw, work)
    assert "settings changed" in resized["rows_full_reason"]
    assert resized["rows_new"] == 26 and CountingImages.hits["/5.jpg"] == 2
    assert not work.exists() and not (tmp_path / ".work-replaced").exists()


def _picture_folder(tmp_path: Path, n: int = 8) -> Path:
    """A folder source of ``n`` pictures ``p<i>.jpg`` captioned ``picture <i>``."""
    src = tmp_path / "pictures"
    src.mkdir()
    for i in range(n):
        (src / f"p{i}.jpg").write_bytes(_jpeg(i))
        (src / f"p{i}.txt").write_text(f"picture {i}")
    return src


def test_folder_sync_notices_a_changed_picture_or_caption(tmp_path: Path):
    src, raw = _picture_folder(tmp_path), tmp_path / "raw"
    params = _params(dataset="folder", source=str(src))
    ingest.run(params, raw, tmp_path / "work")
    ingest.run(params, raw, tmp_path / "work")
    assert _samples(raw)["picture 2"]

    (src / "p2.jpg").write_bytes(_jpeg(30))  # same name and caption, another picture
    (src / "p3.txt").write_text("picture three")  # same picture, another caption
    (src / "p8.jpg").write_bytes(_jpeg(8))
    (src / "p8.txt").write_text("picture 8")
    (src / "p0.jpg").unlink()
    report = ingest.run(params, raw, tmp_path / "work")
    assert (report["rows_new"], report["rows_kept"], report["rows_removed"]) == (3, 5, 3)
    captions = sorted(_samples(raw))
    assert captions == sorted([f"picture {i}" for i in (1, 2, 4, 5, 6, 7, 8)] + ["picture three"])


def _kiln_env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def _dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``dvc ARGS`` in the project copy ``cwd``; its stages run the copy's own code (the
    venv's editable install points at whichever checkout last installed it)."""
    dvc = Path(sys.executable).with_name("dvc")
    return subprocess.run(
        [str(dvc), *args], cwd=cwd, env={**_kiln_env(), "PYTHONPATH": str(cwd)},
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def test_dvc_reruns_ingest_exactly_when_the_source_changed(tmp_path: Path):
    project = copy_project(tmp_path / "kiln")
    src = tmp_path / "pictures"
    src.mkdir()
    for i in range(12):
        (src / f"p{i}.jpg").write_bytes(_jpeg(i))
        (src / f"p{i}.txt").write_text(f"picture {i}")
    config.set_values(
        project / "params.yaml",
        {"ingest.dataset": "folder", "ingest.source": str(src), "ingest.processes": 1},
    )
    metrics = project / "data" / "metrics" / "ingest.json"

    first = _dvc(project, "repro", "ingest")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "Running stage 'ingest'" in first.stdout
    assert json.loads(metrics.read_text())["rows_new"] == 12

    again = _dvc(project, "repro", "ingest")
    assert again.returncode == 0 and "Stage 'ingest' didn't change" in again.stdout
    assert "24 entries, unchanged" in again.stderr

    (src / "p12.jpg").write_bytes(_jpeg(12))
    (src / "p12.txt").write_text("picture 12")
    grown = _dvc(project, "repro", "ingest")
    assert grown.returncode == 0, grown.stdout[-2000:] + grown.stderr[-2000:]
    assert "Running stage 'ingest'" in grown.stdout
    m = json.loads(metrics.read_text())
    assert (m["rows_new"], m["rows_kept"], m["successes"]) == (1, 12, 13)

    # the source vanished: the probe says so in one line, ingest does not run
    src.rename(tmp_path / "moved")
    gone = _dvc(project, "repro", "ingest")
    assert gone.returncode != 0
    assert f"source: image folder {src} does not exist" in gone.stderr
    assert "Running stage 'ingest'" not in gone.stdout
    assert (project / "data" / "raw" / "shards").is_dir()  # the last dataset is kept


def _sides(params: config.Params, raw: Path, clean: Path) -> dict[str, str]:
    """caption -> "train" or "val" after validating ``raw`` into ``clean``."""
    validate.run(params, raw, clean)
    return {
        r.caption: side
        for side in ("train", "val")
        for r in shards.read(shards.shard_paths(clean / side))
    }


def test_a_renamed_picture_keeps_its_side(tmp_path: Path):
    """A folder's picture renamed between two ingests (its caption edited too) is a new
    row, fetched again; it used to draw its side again from its new name, so a picture a
    continuing model trained on could land in val. It keeps its first name's side, also
    through a second rename; a picture new to the folder draws its own."""
    src, raw = tmp_path / "pictures", tmp_path / "raw"
    src.mkdir()
    for i in range(12):
        (src / f"p{i}.jpg").write_bytes(_jpeg(i))
        (src / f"p{i}.txt").write_text(f"picture {i}")
    params = _params(dataset="folder", source=str(src))
    ingest.run(params, raw, tmp_path / "work")
    before = _sides(params, raw, tmp_path / "clean1")
    # pictures whose new names hash to the other side (picked with split.py's own hash)
    moved = {}
    for i in range(12):
        side = before[f"picture {i}"]
        new = next(
            f"renamed-{i}-{n}"
            for n in range(100)
            if ("val" if split.in_val(f"/renamed-{i}-{n}.jpg", 0.3) else "train") != side
        )
        moved[i] = new
    for i in (1, 2, 3):
        (src / f"p{i}.jpg").rename(src / f"{moved[i]}.jpg")
        (src / f"p{i}.txt").rename(src / f"{moved[i]}.txt")
    (src / f"{moved[3]}.txt").write_text("picture 3, captioned anew")
    report = ingest.run(params, raw, tmp_path / "work")
    assert (report["rows_new"], report["rows_removed"]) == (3, 3)
    after = _sides(params, raw, tmp_path / "clean2")
    assert after["picture 1"] == before["picture 1"]
    assert after["picture 2"] == before["picture 2"]
    assert after["picture 3, captioned anew"] == before["picture 3"]
    # a second rename keeps the first name's side
    (src / f"{moved[1]}.jpg").rename(src / "again.jpg")
    (src / f"{moved[1]}.txt").rename(src / "again.txt")
    ingest.run(params, raw, tmp_path / "work")
    assert _sides(params, raw, tmp_path / "clean3")["picture 1"] == before["picture 1"]
