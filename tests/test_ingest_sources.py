"""The other front doors: a local folder with sidecar captions, existing webdataset shards
(local brace pattern, and URLs through the fetch guard), and resuming an interrupted
ingestion without downloading finished shards again."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from training import config
from training.intake import ingest, shards, sources, validate


class Backlog128(http.server.ThreadingHTTPServer):
    """A loopback server whose backlog holds many clients connecting at once (was: set
    on the stdlib class itself, for every later server of the worker process)."""

    request_queue_size = 128


ROOT = Path(__file__).resolve().parents[1]


def _picture(i: int, size: int = 36) -> Image.Image:
    rng = np.random.default_rng(500 + i)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    return coarse.resize((size, size), Image.Resampling.BICUBIC)


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    _picture(i).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _params(**ingest_cfg) -> config.Params:
    return config.resolve(
        {
            "ingest": {"processes": 1, "threads": 8, "samples_per_shard": 10, **ingest_cfg},
            "validate": {"val_fraction": 0.5, "samples_per_shard": 50},
        }
    )


def _captions(directory: Path) -> list[str]:
    return sorted(r.caption for r in shards.read(shards.shard_paths(directory)))


def test_folder_with_sidecar_captions(tmp_path: Path):
    src = tmp_path / "photos"
    (src / "nested").mkdir(parents=True)
    for i in range(6):
        where = src / "nested" if i % 2 else src
        _picture(i).save(where / f"img {i}.png")  # a space: URL-quoted on the way
        (where / f"img {i}.txt").write_text(f"photo number {i}\n")
    _picture(9).save(src / "orphan.jpg")  # no sidecar: rejected by the gate, not lost
    params = _params(dataset="folder", source=str(src))
    report = ingest.run(params, tmp_path / "raw", tmp_path / "work")
    assert report["successes"] == 7 and report["count"] == 7
    assert _captions(tmp_path / "raw" / "shards") == [""] + [f"photo number {i}" for i in range(6)]
    assert (src / "img 0.png").exists()  # the user's folder is left alone
    gate = validate.run(params, tmp_path / "raw", tmp_path / "clean")
    rejects = pd.read_parquet(tmp_path / "clean" / "rejects.parquet")
    assert gate["train"] + gate["val"] == 6
    assert rejects.url.str.endswith("/orphan.jpg").all() and len(rejects) == 1
    assert rejects.failed_checks.iloc[0] == "caption_chars"


def test_a_jsonl_row_missing_a_field_is_the_same_wherever_it_falls(tmp_path: Path, monkeypatch):
    """The bug: the columns were checked again on the first object of every chunk, so a
    row without a caption aborted the whole list there and was an empty caption (a
    recorded reject) anywhere else."""
    monkeypatch.setattr(sources, "CHUNK_ROWS", 2)
    rows = [{"url": f"http://x/{i}.jpg", "caption": f"c{i}"} for i in range(5)]
    del rows[2]["caption"]  # the first row of the second chunk
    path = tmp_path / "list.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = [
        c for chunk in sources._chunks(path, "jsonl", ["url", "caption"]) for c in chunk["caption"]
    ]
    assert got == ["c0", "c1", None, "c3", "c4"]
    path.write_text(json.dumps({"link": "http://x/0.jpg", "caption": "c"}) + "\n")
    with pytest.raises(sources.SourceError, match="no column 'url'"):
        list(sources._chunks(path, "jsonl", ["url", "caption"]))


def test_transparency_is_composited_on_the_configured_background(tmp_path: Path):
    """RGBA images (icons, clip art) keep their opaque pixels; transparent ones take
    ``ingest.background``, not OpenCV's dropped alpha (whatever colour was under it)."""
    src = tmp_path / "icons"
    src.mkdir()
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)  # the profile's size: nothing resampled
    rgba[..., :3] = (10, 200, 30)  # colour under the transparent half too
    rgba[:, 16:, 3] = 255  # right half opaque, left half fully transparent
    Image.fromarray(rgba, "RGBA").save(src / "icon.png")
    (src / "icon.txt").write_text("a green square on the right\n")
    params = _params(dataset="folder", source=str(src), background="#203040", resize_mode="border")
    ingest.run(params, tmp_path / "raw", tmp_path / "work")
    (rec,) = list(shards.read(shards.shard_paths(tmp_path / "raw" / "shards")))
    px = np.asarray(rec.image())
    assert (px[:, :16] == (0x20, 0x30, 0x40)).all()
    assert (px[:, 16:] == (10, 200, 30)).all()
    with pytest.raises(config.ConfigError, match="background"):
        _params(dataset="folder", source=str(src), background="white")


def _write_shards(directory: Path, n_shards: int, per: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with wds.TarWriter(str(directory / f"part-{s}.tar")) as w:
            for j in range(per):
                i = s * per + j
                sample = {"__key__": f"s{s}/{j:03d}", "jpg": _jpeg(i), "txt": f"shard picture {i}"}
                if i == 0:  # a pickle member must never be loaded
                    sample["pyd"] = b"\x80\x04K\x01."
                w.write(sample)


def test_existing_local_shards_by_brace_pattern(tmp_path: Path):
    _write_shards(tmp_path / "wds", 2, 4)
    params = _params(dataset="shards", source=str(tmp_path / "wds" / "part-{0..1}.tar"))
    report = ingest.run(params, tmp_path / "raw", tmp_path / "work")
    assert report["successes"] == 8
    assert report["unpacked"]["ignored_unsafe_members"] == 1
    assert _captions(tmp_path / "raw" / "shards") == sorted(f"shard picture {i}" for i in range(8))


def test_a_shard_that_sorts_first_leaves_the_others_samples_alone(tmp_path: Path):
    """The bug: shards unpacked into folders named by their place in the list, and a
    sample's row id (and so its train/val side) includes that folder. A new shard that
    sorted first moved every other shard's samples: all fetched again under new ids,
    their split drawn again. A shard taken out of the source kept its samples too."""
    wds_dir = tmp_path / "wds"
    _write_shards(wds_dir, 3, 4)  # part-0, part-1, part-2
    (wds_dir / "part-0.tar").rename(tmp_path / "later.tar")
    params = _params(dataset="shards", source=str(wds_dir / "part-*.tar"))
    raw, work = tmp_path / "raw", tmp_path / "work"
    first = ingest.run(params, raw, work)
    assert (first["rows_new"], first["rows_kept"]) == (8, 0)
    (tmp_path / "later.tar").rename(wds_dir / "part-0.tar")  # arrives, and sorts first
    second = ingest.run(params, raw, work)
    assert (second["rows_new"], second["rows_kept"], second["rows_removed"]) == (4, 8, 0)
    assert _captions(raw / "shards") == sorted(f"shard picture {i}" for i in range(12))
    (wds_dir / "part-1.tar").unlink()  # taken out of the collection
    third = ingest.run(params, raw, work)
    assert (third["rows_new"], third["rows_kept"], third["rows_removed"]) == (0, 8, 4)
    assert _captions(raw / "shards") == sorted(
        f"shard picture {i}" for i in (0, 1, 2, 3, 8, 9, 10, 11)
    )


def test_remote_shards_go_through_the_guard(tmp_path: Path):
    _write_shards(tmp_path / "wds", 2, 3)
    with ingest.serve_directory(tmp_path / "wds") as base:
        spec = base + "/part-{0..1}.tar"
        with pytest.raises(sources.SourceError, match="refused: loopback address"):
            ingest.run(_params(dataset="shards", source=spec), tmp_path / "r1", tmp_path / "w1")
        params = _params(dataset="shards", source=spec, allow_networks=["127.0.0.1/32"])
        report = ingest.run(params, tmp_path / "raw", tmp_path / "work")
    assert report["successes"] == 6
    with pytest.raises(sources.SourceError, match="refusing pipe"):
        sources.expand_shards("pipe:curl -s http://x/a.tar")


# ---- resume ------------------------------------------------------------------------------
class _Gate(http.server.BaseHTTPRequestHandler):
    hits: Counter = Counter()
    release = threading.Event()
    images: dict[str, bytes] = {}

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        type(self).hits[self.path] += 1
        n = int(self.path.strip("/").split(".")[0])
        if n >= 30:  # shards 3 and 4 hang until released: the run is killed meanwhile
            type(self).release.wait(60)
        body = self.images[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):  # a killed client
            self.wfile.write(body)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
def test_interrupted_ingest_resumes_without_refetching_done_shards(tmp_path: Path, sig):
    _Gate.hits.clear()
    _Gate.release.clear()
    _Gate.images = {f"/{i}.jpg": _jpeg(i) for i in range(50)}
    srv = Backlog128(("127.0.0.1", 0), _Gate)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    pd.DataFrame(
        {"url": [f"{base}/{i}.jpg" for i in range(50)], "caption": [f"n {i}" for i in range(50)]}
    ).to_parquet(tmp_path / "list.parquet")
    (tmp_path / "params.yaml").write_text(
        "ingest:\n  processes: 1\n  threads: 4\n  samples_per_shard: 10\n  retries: 0\n"
        "  timeout_s: 30\n  deadline_s: 60.0\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "training.cli",
        "ingest",
        "--url-list",
        "list.parquet",
        "--out",
        "raw",
        "--allow-network",
        "127.0.0.1/32",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=env,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        work = tmp_path / "raw" / ".work" / "shards"
        deadline = time.monotonic() + 120
        while len(list(work.glob("*_stats.json"))) < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the first three shards never finished"
            time.sleep(0.2)
        time.sleep(0.5)  # shard 3 is now mid-download
        os.killpg(proc.pid, sig)  # Ctrl-C in a terminal signals the whole group
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0  # an interrupt is never reported as success
        if sig == signal.SIGINT:
            assert "interrupted; run the same command again to resume" in err
        assert not (tmp_path / "raw" / "shards").exists()  # nothing partial was published
        first = Counter(_Gate.hits)
        _Gate.release.set()
        r = subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert "resuming: 3 finished shards kept" in r.stderr
    finally:
        _Gate.release.set()
        srv.shutdown()
        srv.server_close()
    done_urls = {f"/{i}.jpg" for i in range(30)}
    assert all(_Gate.hits[u] == first[u] == 1 for u in done_urls)  # not fetched again
    assert all(_Gate.hits[f"/{i}.jpg"] >= 1 for i in range(30, 50))
    captions = _captions(tmp_path / "raw" / "shards")
    assert captions == sorted(f"n {i}" for i in range(50))  # every sample exactly once
    # shards kept from the killed run and shards made by the resumed one alike: key order
    keys = [r.key for r in shards.read(shards.shard_paths(tmp_path / "raw" / "shards"))]
    assert keys == sorted(keys)
    assert not (tmp_path / "raw" / ".work").exists()


def test_a_thin_strip_is_refused_before_its_short_side_is_scaled_up(tmp_path: Path):
    """img2dataset takes the shorter side to image_size: a 1 x 8,000 strip (116 bytes)
    became 32 x 256,000 px, and at 256 px a 1 x 40,000 one 7 GiB in one thread. The
    resized picture is bounded by max_pixels, as the source is (was: unbounded)."""
    src = tmp_path / "strips"
    src.mkdir()
    Image.new("RGB", (1, 8000), (200, 30, 30)).save(src / "strip.png")
    _picture(0).save(src / "fine.png")
    for name in ("strip", "fine"):
        (src / f"{name}.txt").write_text(f"a {name} picture\n")
    # 32 px: at most 1,000,000 / 32**2 = 976 : 1 after resizing
    params = _params(dataset="folder", source=str(src), image_size=32, max_pixels=1_000_000)
    assert ingest.max_aspect_ratio(32, "buckets", 1_000_000) == 1_000_000 / 32**2
    report = ingest.run(params, tmp_path / "raw", tmp_path / "work")
    assert (report["count"], report["successes"]) == (2, 1)
    assert any("aspect ratio too large" in why for why in report["failures_by_reason"])
    (rec,) = list(shards.read(shards.shard_paths(tmp_path / "raw" / "shards")))
    assert rec.caption == "a fine picture" and rec.image().size == (32, 32)
    # the longer side to image_size (border): nothing grows, nothing refused
    assert ingest.max_aspect_ratio(32, "border", 1_000_000) == float("inf")


def test_a_folder_loses_no_picture_without_a_word(tmp_path: Path, capfd):
    """Were skipped silently: a linked subfolder's pictures (``rglob`` does not follow
    the link), ``.jfif`` files, and the caption of ``UP.JPG`` in ``UP.TXT`` (read as
    missing, then rejected for "caption length"). A link back up is walked once; other
    files are counted by suffix."""
    src, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    src.mkdir()
    elsewhere.mkdir()
    _picture(0).save(elsewhere / "linked.png")
    (elsewhere / "linked.txt").write_text("a linked picture")
    (src / "more").symlink_to(elsewhere, target_is_directory=True)
    (src / "loop").symlink_to(src, target_is_directory=True)  # a link back up
    _picture(1).save(src / "UP.JPG", format="JPEG")
    (src / "UP.TXT").write_text("an upper-case name")
    _picture(2).save(src / "b.jfif", format="JPEG")
    (src / "b.txt").write_text("a jfif picture")
    _picture(3).save(src / "orphan.png")
    (src / "notes.md").write_text("not a picture")
    rows = sources.folder_rows(src)
    assert {r["path"]: r["caption"] for r in rows} == {
        "UP.JPG": "an upper-case name",
        "b.jfif": "a jfif picture",
        "more/linked.png": "a linked picture",
        "orphan.png": "",
    }
    said = capfd.readouterr().err
    assert "1 files in" in said and "left out: .md 1" in said
    assert "1 of 4 images have no .txt caption beside them (e.g. orphan.png)" in said
    # the source's identity sees the linked folder too: a change there is a new source
    from training.intake.kinds import folder

    params = _params(dataset="folder", source=str(src))
    before = folder.identity(params)
    assert any(name == "more/linked.png" for name, *_ in before)
    (elsewhere / "linked.txt").write_text("a linked picture, captioned again")
    assert folder.identity(params) != before
