"""A body or a shard cut short is never kept as if it were whole: a download the server
ended early is a retryable network fault, and a partly copied local tar is one clear
error naming the shard (was: half the samples silently gone, or a bare ReadError)."""

from __future__ import annotations

import contextlib
import http.server
import io
import tarfile
import threading
from pathlib import Path

import pytest
import webdataset as wds

from tests.test_ingest_sources import _jpeg
from training.intake import download, guard, sources, unpack

LOOPBACK = guard.Policy(allow_networks=("127.0.0.1/32",))


def _tar(n: int = 20) -> bytes:
    buf = io.BytesIO()
    with wds.TarWriter(buf) as w:
        for i in range(n):
            w.write({"__key__": f"{i:03d}", "jpg": _jpeg(i), "txt": f"picture {i}"})
    return buf.getvalue()


TAR = _tar()


def _boundary(data: bytes, member: int) -> int:
    """Where member ``member``'s header starts (a cut there ends between samples)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.getmembers()[member].offset


class _Cut(http.server.BaseHTTPRequestHandler):
    """``/cut/<n>``: the whole tar's Content-Length, then ``n`` bytes and a close;
    ``/close/<n>``: ``n`` bytes and a close with no Content-Length; ``/half``: half a
    JPEG under its full length."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        kind, _, arg = self.path.strip("/").partition("/")
        body = _jpeg(1) if kind == "half" else TAR
        sent = len(body) // 2 if kind == "half" else int(arg)
        self.send_response(200)
        if kind != "close":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body[:sent])
        self.close_connection = True


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Cut)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_an_image_body_cut_short_is_a_retryable_network_fault(server, monkeypatch):
    monkeypatch.setattr(download, "_policy", LOOPBACK)  # what install() sets in a worker
    key, data, error = download.download_image((0, f"{server}/half"), 10, "", None)
    assert (key, data, error) == (0, None, "incomplete body")
    assert guard.is_transient(error)


@pytest.mark.parametrize("where", ["boundary", "mid-member"])
def test_a_remote_shard_cut_short_is_retried_not_kept(server, tmp_path: Path, where):
    at = _boundary(TAR, 20) + (700 if where == "mid-member" else 0)
    url = f"{server}/cut/{at}"
    with pytest.raises(ConnectionError, match=rf"shard {url}: incomplete body"):
        unpack.unpack_shards(url, tmp_path / "src", LOOPBACK)
    assert not list((tmp_path / "src").rglob(unpack.DONE))


def test_a_remote_shard_closed_early_without_a_length_is_retried(server, tmp_path: Path):
    url = f"{server}/close/{_boundary(TAR, 20)}"  # ends between samples
    with pytest.raises(ConnectionError, match=rf"shard {url}: download cut short"):
        unpack.unpack_shards(url, tmp_path / "src", LOOPBACK)
    assert not list((tmp_path / "src").rglob(unpack.DONE))


@pytest.mark.parametrize("extra", [0, 700], ids=["boundary", "mid-member"])
def test_a_partly_copied_local_shard_is_one_error_naming_it(tmp_path: Path, extra: int):
    shard = tmp_path / "part.tar"
    shard.write_bytes(TAR[: _boundary(TAR, 20) + extra])
    with pytest.raises(sources.SourceError, match=rf"shard {shard} is cut short .*ingest.source"):
        unpack.unpack_shards(str(shard), tmp_path / "src", LOOPBACK)
    shard.write_bytes(TAR)  # the whole copy: every sample
    stats = unpack.unpack_shards(str(shard), tmp_path / "src", LOOPBACK)
    assert stats["ignored_other_members"] == 0
    assert len(list((tmp_path / "src").rglob("*.jpg"))) == 20


def test_shard_messages_name_no_marker_and_say_what_is_left_out(tmp_path: Path, capfd):
    """Was: the ``.unpacked`` marker was reported as a user's file on every shard
    ingest, and members named ``cat.v2.jpg`` left out with a count in report.json only."""
    from tests.test_ingest_sources import _params
    from training.intake.kinds import tars

    with wds.TarWriter(str(tmp_path / "a.tar")) as w:
        w.write({"__key__": "dog", "jpg": _jpeg(1), "txt": "a dog"})
    with tarfile.open(tmp_path / "a.tar", "a") as tf:
        for name, data in (("cat.v2.jpg", _jpeg(2)), ("cat.v2.txt", b"a cat")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    capfd.readouterr()
    prepared = tars.prepare(_params(dataset="shards", source=str(tmp_path / "a.tar")), tmp_path)
    out = capfd.readouterr()
    said = out.out + out.err
    assert [r["caption"] for r in prepared.rows] == ["a dog"]
    assert "not images" not in said and "(no suffix)" not in said
    assert "2 tar members left out" in said and "'cat.v2.jpg'" in said
