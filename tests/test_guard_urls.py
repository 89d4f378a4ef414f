"""URLs as people write them: a space or a non-ASCII letter in the path is fetched
percent-encoded, as browsers and curl send it (was: lost as ``InvalidURL`` or
``UnicodeEncodeError``); a control character is refused with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_ingest_sources import _jpeg
from training.intake import download, guard
from training.intake.serve import serve_directory

LOOPBACK = guard.Policy(allow_networks=("127.0.0.1/32",))


@pytest.mark.parametrize("name", ["sp ace.jpg", "naïve.jpg"])
def test_a_url_with_a_space_or_non_ascii_letter_is_fetched(tmp_path: Path, monkeypatch, name):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / name).write_bytes(_jpeg(3))
    monkeypatch.setattr(download, "_policy", LOOPBACK)  # what install() sets in a worker
    with serve_directory(tmp_path) as base:
        url = f"{base}/img/{name}?size=big one&é=1"
        body, _ = guard.fetch_bytes(url, 10, LOOPBACK)
        key, data, error = download.download_image((7, url), 10, "", None)
    assert body == _jpeg(3)
    assert (key, error) == (7, None) and data is not None


def test_the_wire_url_keeps_what_is_already_encoded():
    assert guard.wire_url("http://h/a%20b/c d.jpg?x=%2F y") == "http://h/a%20b/c%20d.jpg?x=%2F%20y"


@pytest.mark.parametrize("url", ["http://127.0.0.1/1\x00.jpg", "http://127.0.0.1/a\tb.jpg"])
def test_a_control_character_in_a_url_is_refused_with_a_reason(url: str):
    with pytest.raises(guard.Refused, match=r"^malformed URL \(control character\)$"):
        guard.fetch_bytes(url, 10, LOOPBACK)
