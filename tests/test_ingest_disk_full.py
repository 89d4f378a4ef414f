"""Ingest on a disk that fills: one line that says so, nothing kept that is not whole,
and a re-run after room is made that publishes every picture (README, "Reliability").

On real tmpfs filesystems (root and mount(8); skipped otherwise), but the cut stats file.
"""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from tests.conftest import tmpfs
from training import config
from training.intake import download, ingest, shards

N = 60  # noise pictures of 32 px: about 5.5 kB each in a tar, 330 kB in all


def _mount(disk: Path, size: str, remount: bool = False) -> None:
    opts = f"remount,size={size}" if remount else f"size={size}"
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(disk)], check=False)
    assert proc.returncode == 0


@pytest.fixture
def disk(tmp_path: Path):
    with tmpfs(tmp_path / "disk", "128k") as disk:
        yield disk


def _folder(root: Path) -> Path:
    src = root / "src"
    src.mkdir()
    for i in range(N):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text(f"noise number {i}\n")
    return src


def test_a_full_disk_stops_ingest_as_a_full_disk_and_a_rerun_publishes_all(tmp_path, disk):
    """Was: "1 shard(s) did not finish; re-run `kiln ingest` to retry them", a
    ConnectionError the flow retried twice on the same full disk, with the reason only
    in img2dataset's hundreds of tracebacks."""
    params = config.resolve(
        {
            "ingest": {
                "dataset": "folder",
                "source": str(_folder(tmp_path)),
                "image_size": 32,
                "processes": 1,
                "threads": 4,
                "samples_per_shard": 100,
            }
        }
    )
    out, work = disk / "raw", disk / "work"
    with pytest.raises(OSError) as info:
        ingest.run(params, out, work)
    assert info.value.errno == errno.ENOSPC and not isinstance(info.value, ConnectionError)
    msg = str(info.value)
    assert "\n" not in msg and "could not be written in" in msg and "free" in msg, msg
    assert list((work / "shards").glob("00000.*")) == []  # the partial shard is not kept
    _mount(disk, "8m", remount=True)
    report = ingest.run(params, out, work)
    published = list(shards.read(shards.shard_paths(out / "shards")))
    assert report["successes"] == len(published) == N


def test_a_shard_whose_write_failed_is_not_closed_as_finished(tmp_path, disk):
    """img2dataset counts a picture as a success before writing it, and takes a failed
    write as that one sample's: with the disk full for a moment, the shard was closed,
    given its stats and published, its tar cut at the failed member ("300/300 images"
    published as 78). The writer Kiln hands img2dataset fails the shard at close."""
    from img2dataset.writer import WebDatasetSampleWriter

    made = download.guarded_downloader_class(download.Policy())(
        sample_writer_class=WebDatasetSampleWriter,
        resizer=None,
        thread_count=1,
        save_caption=True,
        extract_exif=False,
        output_folder=str(disk),
        column_list=["key", "caption"],
        timeout=1,
        number_sample_per_shard=100,
        oom_shard_count=5,
        compute_hash=None,
        verify_hash_type=None,
        encode_format="png",
        retries=0,
        user_agent_token=None,
        disallowed_header_directives=None,
    )
    schema = pa.schema([("key", pa.string()), ("caption", pa.string())])
    writer = made.sample_writer_class(0, str(disk), True, 5, schema, "png")
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (100 << 10))  # leaves room for a few pictures only
    noise = np.random.default_rng(0).integers(0, 256, 30_000, dtype=np.uint8).tobytes()
    failures = 0
    for i in range(20):
        try:  # as img2dataset's download_shard does: a failed write is one sample's
            writer.write(noise, f"{i:05d}", "noise", {"key": f"{i:05d}", "caption": "noise"})
        except OSError:
            failures += 1
    assert failures  # the disk was full
    filler.unlink()  # ... for a moment: closing the shard now succeeds
    with pytest.raises(OSError, match="not whole"):
        writer.close()  # so img2dataset writes no stats file, and retries the shard


def test_a_stats_file_cut_short_is_an_unfinished_shard(tmp_path):
    """img2dataset writes a shard's stats last, without a temp name: on a disk that
    filled then, the empty file made the shard finished (to img2dataset too, which never
    redid it), and every re-run of ingest stopped on 'Expecting value'."""
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    for name in ("00000.tar", "00000.parquet", "00001.tar", "00001.parquet"):
        (shard_dir / name).write_bytes(b"x")
    (shard_dir / "00000_stats.json").write_text('{"count": 1, "successes": 1}')
    (shard_dir / "00001_stats.json").write_text("")
    assert ingest.finished_shards(shard_dir) == (["00000"], ["00001"])
    assert not (shard_dir / "00001_stats.json").exists()  # so img2dataset redoes it
