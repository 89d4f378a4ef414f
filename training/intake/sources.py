"""What ``kiln ingest`` can read, turned into the one thing img2dataset takes: a URL list.

- **url-list**: parquet, csv, tsv or jsonl (LAION / CC3M style) with configurable url and
  caption columns. It is checked and rewritten as a normalised parquet *before any
  download*: a missing column or non-text values stop the run with one clear error, and
  bytes that are not UTF-8 are kept as U+FFFD (the quality gate then rejects that
  caption, with its reason) instead of crashing the reader. Read in chunks, so a large
  list never sits in memory twice.
- **folder**: images with sidecar captions (``x.jpg`` + ``x.txt``), served from a
  loopback HTTP server, so resizing, stats and rejects are exactly the web path's.
- **shards**: existing webdataset tars (a path, a glob, a brace pattern such as
  ``data/{00000..00009}.tar``, or http(s) URLs fetched through the SSRF guard). They are
  unpacked into a work folder shard by shard and then take the folder path. Members are
  never unpickled: ``.pyd``/``.pickle`` members are ignored and counted, and ``pipe:``
  URLs (shell commands) are refused.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from training.console import say
from training.intake.canonical import shard_spelling

FORMATS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
}
# .jfif is JPEG; .avif decodes where Pillow has it, else is refused by name at ingest
IMAGE_SUFFIXES = (
    ".jpg", ".jpeg", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif",
)  # fmt: skip
UNSAFE_SUFFIXES = (".pyd", ".pickle", ".pkl", ".pth", ".pt", ".npy")
CHUNK_ROWS = 50_000


class SourceError(ValueError):
    """A source that cannot be ingested at all; raised before anything is downloaded."""


def check_url_list(path: Path) -> None:
    """One line naming ``path`` when it cannot be a url list at all (no file, a folder,
    an empty file, an unsupported format); the contents are checked while normalising."""
    if not path.exists():
        raise SourceError(f"url list {path} does not exist")
    if not path.is_file():
        raise SourceError(f"url list {path} is not a file (for a folder of images use --folder)")
    list_format(path)
    if path.stat().st_size == 0:
        raise SourceError(f"url list {path} is empty (0 bytes)")


def check_folder(folder: Path) -> None:
    """One line naming ``folder`` when it does not exist or is not a directory."""
    if not folder.exists():
        raise SourceError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise SourceError(
            f"image folder {folder} is not a folder (for a url list use --url-list, for "
            "webdataset tars --shards)"
        )


def list_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SourceError(
            f"{path}: unsupported url list format {path.suffix!r} (parquet, csv, tsv, jsonl)"
        )
    return fmt


def _chunks(path: Path, fmt: str, cols: list[str]) -> Iterator[dict[str, list]]:
    """Yield column dicts of at most CHUNK_ROWS rows; raises SourceError on a missing
    column. Values keep their parsed types so the caller can check them."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        _need(path, cols, names)
        for batch in pf.iter_batches(batch_size=CHUNK_ROWS, columns=cols):
            yield batch.to_pydict()
    elif fmt in ("csv", "tsv"):
        import csv

        import pandas as pd

        # A TSV (CC3M style, IANA text/tab-separated-values) has no quoting: one row per
        # line, fields verbatim. Read with CSV quoting, a caption starting with `"` lost
        # its quotes, and an unbalanced one swallowed the lines after it into one caption
        # (rows silently gone). A CSV keeps its real quoting.
        encoding, nul = _text_encoding(path)
        reader = pd.read_csv(
            path,
            sep="," if fmt == "csv" else "\t",
            encoding=encoding,
            # pandas' C parser ends a field at a NUL byte: "a red car\0 parked" was kept
            # as "a red car", a URL cut short the same way. The python parser keeps the
            # NUL, which the gate then rejects (caption_printable) or the fetch guard
            # refuses (a control character in a URL), each row with its reason.
            engine="python" if nul else "c",
            quoting=csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE,
            dtype=str,
            keep_default_na=False,
            chunksize=CHUNK_ROWS,
            encoding_errors="replace",
        )
        for i, df in enumerate(reader):
            if i == 0:
                _need(path, cols, list(df.columns))
            yield {c: df[c].tolist() for c in cols}
    else:
        if _text_encoding(path)[0] != "utf-8":  # lines split on b"\n" would cut its text
            raise SourceError(f"{path}: UTF-16 text; save it as UTF-8 (one JSON object a line)")
        rows: list[dict] = []
        checked = False
        with open(path, "rb") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:  # -sig: a byte-order mark (Windows editors write one) is no text
                    obj = json.loads(line.decode("utf-8-sig", errors="replace"))
                except json.JSONDecodeError as exc:
                    raise SourceError(f"{path}:{n}: not a JSON object ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise SourceError(f"{path}:{n}: expected a JSON object per line")
                if not checked:  # the first object names the columns, as a CSV header
                    # does; a later one missing a field gets None (a recorded reject), as
                    # it would anywhere else in the file, not only at a chunk's start
                    _need(path, cols, list(obj))
                    checked = True
                rows.append(obj)
                if len(rows) >= CHUNK_ROWS:
                    yield {c: [_utf8(r.get(c)) for r in rows] for c in cols}
                    rows = []
        if rows:
            yield {c: [_utf8(r.get(c)) for r in rows] for c in cols}


_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _text_encoding(path: Path) -> tuple[str, bool]:
    """(the encoding to read ``path`` with, whether it holds a NUL byte). A UTF-16 list
    (Excel's "Unicode text") with its byte-order mark is read as UTF-16; without one,
    it was read as UTF-8 into garbage column names (``no column 'url' (columns: ��u,
    ...)``): refused, saying what the file is. One pass over the bytes."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
        if head.startswith(_UTF16_BOMS):
            return "utf-16", False
        if head.count(0) * 4 >= len(head):  # ASCII text as UTF-16: every other byte 0
            raise SourceError(
                f"{path}: not UTF-8 text (UTF-16 without a byte-order mark?); save it as "
                "UTF-8 (Excel: CSV UTF-8)"
            )
        nul = b"\0" in head
        while not nul and (block := fh.read(1 << 20)):
            nul = b"\0" in block
    return "utf-8", nul


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _utf8(value):
    """A JSON string may spell a lone surrogate (``"\\ud800"``, a JS string cut mid-emoji):
    text with no UTF-8 form, which the parquet writer refused, taking the whole list with
    it. Like bytes that are not UTF-8 elsewhere, it becomes U+FFFD, so the gate rejects
    that one row (``caption_utf8``) and says why. (Pairs were joined by ``json.loads``.)"""
    return _SURROGATE.sub("\ufffd", value) if isinstance(value, str) else value


def _need(path: Path, cols: list[str], names: list[str]) -> None:
    missing = [c for c in cols if c not in names]
    if missing:
        raise SourceError(
            f"{path}: no column {missing[0]!r} (columns: {', '.join(map(str, names))}); "
            "set --url-col/--caption-col (ingest.url_col/caption_col)"
        )


def normalize_url_list(path: Path, url_col: str, caption_col: str, out: Path) -> int:
    """Check ``path`` and write it as ``out`` (parquet: url, caption); returns the row
    count. Raises SourceError naming the file, column and first offending row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    check_url_list(path)
    fmt = list_format(path)
    schema = pa.schema([("url", pa.string()), ("caption", pa.string())])
    total = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for chunk in _chunks(path, fmt, [url_col, caption_col]):
                for col, what in ((url_col, "URLs"), (caption_col, "captions")):
                    for i, v in enumerate(chunk[col]):
                        if v is not None and not isinstance(v, str):
                            raise SourceError(
                                f"{path}: column {col!r} must hold text ({what}); row "
                                f"{total + i + 1} has {type(v).__name__} {v!r}"
                            )
                urls = ["" if v is None else v.strip() for v in chunk[url_col]]
                caps = ["" if v is None else v for v in chunk[caption_col]]
                writer.write_table(pa.table({"url": urls, "caption": caps}, schema=schema))
                total += len(urls)
    except SourceError:
        tmp.unlink(missing_ok=True)
        raise
    except (ValueError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise SourceError(f"{path}: cannot read it as {fmt}: {exc}") from None
    if total == 0:
        tmp.unlink(missing_ok=True)
        raise SourceError(f"{path}: the url list has no rows")
    tmp.replace(out)
    return total


def folder_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, subfolders included, and those a link to a folder
    leads to (Python 3.11's ``rglob`` does not follow one: its pictures were neither
    ingested nor counted); a folder reached twice (a link back up) is walked once."""
    files, walked = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in walked:
            dirs[:] = []
            continue
        walked.add(real)
        files += [p for n in names if (p := Path(root) / n).is_file()]
    return sorted(files)


def folder_rows(folder: Path, own: tuple[str, ...] = ()) -> list[dict]:
    """(path relative to ``folder``, caption) for each image; a missing sidecar gives an
    empty caption, which the quality gate rejects with its reason (never silently). The
    sidecar is the image's name with ``.txt`` in any case (``UP.TXT`` beside
    ``UP.JPG``). Files that are neither images by their suffix nor sidecars are counted
    and named by suffix (was: skipped without a word); Kiln's ``own`` file names (a
    shard's unpacked marker) are not the user's and are not counted."""
    check_folder(folder)
    files = [p for p in folder_files(folder) if p.name not in own]
    sidecars = {(p.parent, p.stem): p for p in files if p.suffix.lower() == ".txt"}
    rows, uncaptioned, other = [], [], Counter()
    for p in files:
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            if p.suffix.lower() != ".txt":
                other[p.suffix.lower() or "(no suffix)"] += 1
            continue
        side = sidecars.get((p.parent, p.stem))
        # -sig: a byte-order mark would stay in the caption, pass every check and be
        # trained into the text encoder
        raw = side.read_bytes() if side is not None else b""
        caption = raw.decode("utf-8-sig", errors="replace")
        rel = p.relative_to(folder).as_posix()
        rows.append({"path": rel, "caption": caption.strip()})
        if side is None:
            uncaptioned.append(rel)
    if other:
        shown = ", ".join(f"{k} {n}" for k, n in sorted(other.items()))
        say(
            f"ingest: {sum(other.values())} files in {folder} are not images by their "
            f"suffix ({', '.join(IMAGE_SUFFIXES)}) nor .txt captions, left out: {shown}"
        )
    if uncaptioned and rows:
        say(
            f"ingest: {len(uncaptioned)} of {len(rows)} images have no .txt caption beside "
            f"them (e.g. {uncaptioned[0]}): validate rejects them for an empty caption"
        )
    if not rows:
        raise SourceError(
            f"image folder {folder} holds no images (looked for {', '.join(IMAGE_SUFFIXES)}, "
            "in subfolders too)"
        )
    return rows


def url_path(path: str) -> str:
    """``path`` (relative, ``/``-separated) quoted for a URL of ``serve_directory``.

    A file name that is not UTF-8 (``b"caf\\xe9.png"``) reaches Python as
    ``"caf\\udce9.png"`` (``os.fsdecode``); ``quote()`` refuses the surrogate. Encoded
    with ``surrogatepass`` it becomes ``caf%ED%B3%A9.png``, which the stdlib server
    unquotes with ``surrogatepass`` back to ``"caf\\udce9.png"`` and opens, through
    ``os.fsencode``, as the very file. (``%E9``, the raw byte, would not decode there
    and become U+FFFD: a 404.) A UTF-8 name quotes as it always did."""
    return quote(path.encode("utf-8", "surrogatepass"))


def url_rows(base: str, rows: list[dict]) -> dict[str, list]:
    return {
        "url": [f"{base}/{url_path(r['path'])}" for r in rows],
        "caption": [r["caption"] for r in rows],
    }


def expand_shards(spec: str) -> list[str]:
    """Brace patterns and globs to a sorted shard list; ``pipe:`` is refused."""
    from braceexpand import braceexpand

    if spec.startswith("pipe:"):
        raise SourceError(f"refusing pipe: shard URL {spec!r} (it runs a shell command)")
    out: list[str] = []
    for item in braceexpand(spec):
        if "://" in item or item.startswith("pipe:"):
            out.append(item)
        elif any(ch in item for ch in "*?["):
            out.extend(sorted(glob.glob(item)))
        else:
            out.append(item)
    if not out:
        raise SourceError(f"no shards match {spec!r}")
    return out


def shard_folder(shard: str) -> str:
    """The folder a shard unpacks into: named by the shard itself (its file name, for
    people, and a digest of the path or URL as given), never by its place in the list.
    A sample's row id, and with it its train/val side, include this folder: a
    positional name moved every later shard's samples when a shard that sorts earlier
    arrived, so they were fetched again and their split drawn again (val images of the
    last week in training, and the other way round). The path or URL is taken in one
    spelling (``canonical.shard_spelling``): ``./a.tar`` or a re-signed URL is the same
    shard, whose samples are neither fetched again nor split again."""
    shard = shard_spelling(shard)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", shard.rstrip("/").rsplit("/", 1)[-1])[:40]
    return f"{stem}-{hashlib.sha1(shard.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"
