"""normalize's limits and failures: ``ingest.max_pixels`` is the limit even above
Pillow's own, and every cut or corrupt picture gets the same reason."""

from __future__ import annotations

import http.server
import io
import threading

import numpy as np
import pytest
from PIL import Image

from training.intake import download
from training.intake.download import Refused, normalize
from training.intake.guard import Policy


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_max_pixels_above_pillows_own_limit_is_the_limit(monkeypatch):
    """Was: Pillow refuses over twice its ``MAX_IMAGE_PIXELS`` (179 M) in open, and that
    became "over ingest.max_pixels, 300,000,000" for a 182 M picture. Here Pillow's limit
    is scaled down to 1,000 (refusing over 2,000) and max_pixels is 5,000."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = _png(60, 60)  # 3,600 px: over Pillow's 2,000, under max_pixels
    assert normalize(data, 5000) is data
    with pytest.raises(Refused, match=r"over ingest.max_pixels, 5,000; raise it"):
        normalize(_png(80, 80), 5000)  # 6,400: over max_pixels itself
    with pytest.raises(Refused, match=r"over ingest.max_pixels, 5,000; raise it"):
        normalize(_png(120, 120), 5000)  # over twice it too: Pillow's own refusal


def test_pillows_limit_is_never_lowered(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = _png(30, 30)
    assert normalize(data, 10**8) is data
    normalize(data, 900)
    assert Image.MAX_IMAGE_PIXELS == 10**8


@pytest.mark.parametrize("fmt", ["WEBP", "PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_a_cut_picture_is_truncated_or_corrupt_in_every_format(fmt: str, keep: float):
    """Was: a cut WebP (and a JPEG cut early) fails in Image.open with OSError, which
    only the recorded exception name ("OSError") described."""
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, format=fmt)
    data = buf.getvalue()
    with pytest.raises(Refused, match="^truncated or corrupt image$"):
        normalize(data[: int(len(data) * keep)], 10**8)


class _Big(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200)
        if self.path == "/sized":
            self.send_header("Content-Length", "4096")
        self.end_headers()
        self.wfile.write(b"\0" * 4096)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("path", ["/sized", "/unsized"])
def test_a_file_over_max_bytes_names_the_setting(monkeypatch, path: str):
    """Was: "larger than max_bytes" alone, which names no setting (for a folder's own
    pictures too: they are served to the same downloader on loopback)."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _Big)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        policy = Policy(allow_networks=("127.0.0.1/32",), max_bytes=1024)
        monkeypatch.setattr(download, "_policy", policy)
        url = f"http://127.0.0.1:{server.server_port}{path}"
        key, body, why = download.download_image((7, url), 5, "kiln", None)
    finally:
        server.shutdown()
        server.server_close()
    assert (key, body) == (7, None)
    assert why == (
        "larger than max_bytes (ingest.max_bytes, 1,024 bytes; raise it for files that large)"
    )
