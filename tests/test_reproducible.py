"""Two fresh runs of ingest and validate over the same source and params write the same
bytes: DVC hashes the files, so anything else would make two fresh pipelines train on
differently ordered data (and call every downstream stage stale)."""

from __future__ import annotations

import hashlib
import tarfile
import time
from pathlib import Path

import pytest

from training import config
from training.intake import ingest, serve, shards, validate


def _params() -> config.Params:
    return config.resolve(
        {
            "ingest": {"num_samples": 60, "processes": 1, "threads": 8, "samples_per_shard": 25},
            "validate": {"samples_per_shard": 20, "val_fraction": 0.2},
        }
    )


class _UnevenHandler(serve._QuietHandler):
    """Answers every third image late, so img2dataset's threads finish out of order (as
    they do on the web) whatever the machine's load."""

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        name = self.path.rsplit("/", 1)[-1].split(".")[0]
        if name.isdigit() and int(name) % 3 == 0:
            time.sleep(0.05)
        super().do_GET()


def _hashes(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.relative_to(root).as_posix().startswith(skip)
    }


def _keys(tar: Path) -> list[str]:
    with tarfile.open(tar) as tf:
        return list(dict.fromkeys(m.name.split(".")[0] for m in tf))


@pytest.fixture
def uneven(monkeypatch):
    monkeypatch.setattr(serve, "_QuietHandler", _UnevenHandler)


def test_two_fresh_ingests_and_validates_write_identical_bytes(tmp_path: Path, uneven):
    params = _params()
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        ingest.run(params, out / "raw", out / "work")
        validate.run(params, out / "raw", out / "clean")
        runs.append(out)
    a, b = runs
    raw = _hashes(a / "raw")
    assert len([k for k in raw if k.endswith(".tar")]) == 3
    for tar in sorted((a / "raw" / "shards").glob("*.tar")):
        keys = _keys(tar)
        assert keys == sorted(keys), f"{tar.name}: samples not in key order: {keys}"
        with tarfile.open(tar) as tf:
            assert {(m.mtime, m.uid, m.gid, m.mode) for m in tf} == {(0, 0, 0, 0o444)}
    assert raw == _hashes(b / "raw")
    # the loopback server's random port is not recorded; the split still hashes the path
    rec = next(shards.read(shards.shard_paths(a / "raw" / "shards")))
    assert rec.meta["url"] == f"kiln://shapes/{int(rec.key):07d}.png"
    # the clean splits too (the GX Data Docs HTML carries its run's time: not data)
    clean = _hashes(a / "clean", skip=("data_docs/",))
    assert {"train/train-00000.tar", "val/val-00000.tar", "rejects.parquet", "report.json"} <= set(
        clean
    )
    assert clean == _hashes(b / "clean", skip=("data_docs/",))


def test_sorting_a_shard_again_changes_nothing(tmp_path: Path):
    """The rewrite runs again when an interrupted publish is resumed: it must be stable."""
    with shards.ShardWriter(tmp_path, "x", 100) as w:
        for k in ("b", "c", "a"):
            w.write(shards.Record(k, b"img-" + k.encode(), "png", f"cap {k}", {"url": k}))
    src = tmp_path / "x-00000.tar"
    shards.sort_tar(src, tmp_path / "once.tar")
    shards.sort_tar(tmp_path / "once.tar", tmp_path / "twice.tar")
    assert _keys(tmp_path / "once.tar") == ["a", "b", "c"]
    assert (tmp_path / "once.tar").read_bytes() == (tmp_path / "twice.tar").read_bytes()
    assert [r.caption for r in shards.read([tmp_path / "twice.tar"])] == ["cap a", "cap b", "cap c"]
