"""What a source's bytes mean: TSV lines read verbatim, byte-order marks, lone surrogates in
JSON, and images whose bit depth OpenCV would keep."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from training.intake import sources
from training.intake.checks import caption_is_text
from training.intake.download import normalize


def _read(path: Path, tmp_path: Path) -> list[dict]:
    out = tmp_path / "urls.parquet"
    n = sources.normalize_url_list(path, "url", "caption", out)
    rows = pq.read_table(out).to_pylist()
    assert n == len(rows)
    return rows


def test_a_tsv_is_one_row_per_line_with_captions_verbatim(tmp_path: Path):
    """Was: read with CSV quoting, a caption starting with `"` lost its quotes and an
    unbalanced one swallowed the next lines (6 rows read as 4, one caption holding tabs,
    newlines and two other rows' URLs)."""
    captions = [
        '"The Scream" by Munch',
        'say "hi"',
        '"unbalanced quote start',
        "row four",
        'row five, 12" vinyl',
        "row six",
    ]
    lines = ["caption\turl"] + [f"{c}\thttp://a.example/{i}.jpg" for i, c in enumerate(captions)]
    (tmp_path / "l.tsv").write_text("\n".join(lines) + "\n")
    rows = _read(tmp_path / "l.tsv", tmp_path)
    assert rows == [
        {"url": f"http://a.example/{i}.jpg", "caption": c} for i, c in enumerate(captions)
    ]


def test_a_csv_keeps_its_quoting(tmp_path: Path):
    (tmp_path / "l.csv").write_text(
        'url,caption\nhttp://a.example/0.jpg,"""The Scream"", by Munch"\n'
        'http://a.example/1.jpg,"two\nlines"\n'
    )
    rows = _read(tmp_path / "l.csv", tmp_path)
    assert [r["caption"] for r in rows] == ['"The Scream", by Munch', "two\nlines"]


def _resized_border(data: bytes) -> bytes:
    """``data`` as img2dataset stores it: ``border`` mode pads to a square with white."""
    from img2dataset.resizer import ResizeMode, Resizer

    out, *_ = Resizer(
        image_size=32,
        resize_mode=ResizeMode.border,
        resize_only_if_bigger=False,
        encode_format="png",
        encode_quality=1,
    )(io.BytesIO(normalize(data, 10**8)))
    return out


def test_a_16_bit_rgb_png_is_stored_as_8_bit():
    """Was: Pillow calls a 16-bit RGB PNG "RGB", so it passed through as it came; OpenCV
    decoded it as uint16, img2dataset's white border (255) came out near-black and the
    shard held a 16-bit PNG."""
    a = np.zeros((40, 80, 3), np.uint16)  # BGR: pure red, wide, so border mode pads it
    a[..., 2] = 65535
    a[:, :8, 1] = 0x8000  # the left edge orange: scaled to 8 bits, not clipped
    data = cv2.imencode(".png", a)[1].tobytes()
    assert Image.open(io.BytesIO(data)).mode == "RGB"  # what let it through
    stored = normalize(data, 10**8)
    assert cv2.imdecode(np.frombuffer(stored, np.uint8), cv2.IMREAD_UNCHANGED).dtype == np.uint8
    img = Image.open(io.BytesIO(stored))
    assert img.getpixel((40, 20)) == (255, 0, 0) and img.getpixel((2, 20)) == (255, 128, 0)
    padded = _resized_border(data)
    assert cv2.imdecode(np.frombuffer(padded, np.uint8), cv2.IMREAD_UNCHANGED).dtype == np.uint8
    square = Image.open(io.BytesIO(padded)).convert("RGB")
    assert square.getpixel((16, 0)) == (255, 255, 255)  # the padding: white, not black
    assert square.getpixel((16, 16)) == (255, 0, 0)


def test_an_8_bit_rgb_png_still_passes_untouched():
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), (10, 200, 30)).save(buf, format="PNG")
    data = buf.getvalue()
    assert normalize(data, 10**8) is data


BOM = "\ufeff".encode()


def test_a_byte_order_mark_starts_no_list(tmp_path: Path):
    """Was: a JSONL list starting with a BOM was refused whole ("Unexpected UTF-8 BOM")."""
    lists = {
        "l.jsonl": '{"url": "http://a.example/0.jpg", "caption": "a red cat"}\n',
        "l.csv": "url,caption\nhttp://a.example/0.jpg,a red cat\n",
        "l.tsv": "url\tcaption\nhttp://a.example/0.jpg\ta red cat\n",
    }
    for name, text in lists.items():
        (tmp_path / name).write_bytes(BOM + text.encode())
        assert _read(tmp_path / name, tmp_path) == [
            {"url": "http://a.example/0.jpg", "caption": "a red cat"}
        ], name


def test_a_byte_order_mark_starts_no_sidecar_caption(tmp_path: Path):
    """Was: a sidecar caption kept it as its first character, passed every check and
    was trained into the text encoder."""
    folder = tmp_path / "pics"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "a.txt").write_bytes(BOM + b"a red cat\r\n")
    assert sources.folder_rows(folder) == [{"path": "a.png", "caption": "a red cat"}]


def test_a_lone_surrogate_in_json_is_one_rejected_caption(tmp_path: Path):
    """Was: ``"\\ud800"`` (a JS string cut mid-emoji) made the parquet writer raise, and
    the whole list was refused naming no row. It has no UTF-8 form, like undecodable
    bytes, so it becomes U+FFFD: that row is rejected by the gate (``caption_utf8``),
    the others are read as they are (an escaped pair stays one emoji)."""
    from training.intake.checks import CAPTION_REPLACEMENT

    (tmp_path / "l.jsonl").write_text(
        '{"url": "http://a.example/0.jpg", "caption": "ok \\ud83d\\ude00"}\n'
        '{"url": "http://a.example/1.jpg", "caption": "cut \\ud83d"}\n'
        '{"url": "http://a.example/2.jpg", "caption": "fine"}\n'
    )
    rows = _read(tmp_path / "l.jsonl", tmp_path)
    assert [r["caption"] for r in rows] == ["ok \U0001f600", "cut \ufffd", "fine"]
    assert CAPTION_REPLACEMENT in rows[1]["caption"]  # what the gate's caption_utf8 reads


def test_a_float_tiff_is_refused_not_stored_black():
    """Was: a 32-bit float picture (values 0-1, as scientific TIFFs hold) went through
    ``convert("RGB")``, which clips 0.5 to 0: a flat black sample that passed every check."""
    from training.intake.download import Refused

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 0.5, np.float32), "F").save(buf, format="TIFF")
    with pytest.raises(Refused, match="32-bit float pixels"):
        normalize(buf.getvalue(), 10**8)


def test_a_picture_over_max_pixels_is_refused_naming_the_knob():
    """A 48 MP phone photo is over the default 40 M: the reason says which setting lets it
    in (was: "decompression bomb" alone)."""
    from training.intake.download import Refused

    buf = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buf, format="PNG")
    with pytest.raises(Refused, match=r"over ingest.max_pixels, 5,000; raise it"):
        normalize(buf.getvalue(), 5000)
    assert normalize(buf.getvalue(), 10_000) == buf.getvalue()  # at the limit: fine


@pytest.mark.parametrize("name, sep", [("l.csv", ","), ("l.tsv", "\t")])
def test_a_nul_in_a_list_cuts_no_caption_or_url_short(tmp_path: Path, name: str, sep: str):
    """Was: pandas' C parser ended the field at the NUL, and kept "a red car" and
    "http://a.example/1": a silently wrong caption and URL. Kept whole, the gate rejects
    the caption (control character) and the guard refuses the URL, each with its reason."""
    cap = "a red car\x00 parked on a street at night"
    text = (
        f"url{sep}caption\nhttp://a.example/1\x00.jpg{sep}{cap}\nhttp://a.example/2.jpg{sep}two\n"
    )
    (tmp_path / name).write_text(text)
    assert _read(tmp_path / name, tmp_path) == [
        {"url": "http://a.example/1\x00.jpg", "caption": cap},
        {"url": "http://a.example/2.jpg", "caption": "two"},
    ]
    assert not caption_is_text(cap)


def test_a_utf16_list_is_read_or_named_as_utf16(tmp_path: Path):
    """Was: ``no column 'url' (columns: ��u, Unnamed: 1)``, not a word of the encoding."""
    text = "url\tcaption\nhttp://a.example/0.jpg\tnaïve café\n"
    (tmp_path / "l.tsv").write_bytes(text.encode("utf-16"))  # Excel's "Unicode text"
    rows = [{"url": "http://a.example/0.jpg", "caption": "naïve café"}]
    assert _read(tmp_path / "l.tsv", tmp_path) == rows
    (tmp_path / "l.csv").write_bytes(text.replace("\t", ",").encode("utf-16-le"))  # no BOM
    with pytest.raises(sources.SourceError, match=r"l\.csv: not UTF-8 text \(UTF-16"):
        _read(tmp_path / "l.csv", tmp_path)
    (tmp_path / "l.jsonl").write_bytes('{"url": "u", "caption": "c"}\n'.encode("utf-16"))
    with pytest.raises(sources.SourceError, match=r"l\.jsonl: UTF-16 text; save it as UTF-8"):
        _read(tmp_path / "l.jsonl", tmp_path)
