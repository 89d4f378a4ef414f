"""What a source's bytes mean: TSV lines read verbatim, byte-order marks, lone surrogates in
JSON, and images whose bit depth OpenCV would keep."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from training.intake import sources


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
