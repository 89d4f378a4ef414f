"""The duplicates validate rejected, shown side by side: a page a person can judge.

Whether two variants of one drawing are "the same" depends on the collection (a web
crawl's mirrors, or a curated set's captioned variants), so the ``near_duplicates``
policy is the user's call (``params.yaml``), and this page is what they decide from:
each rejected sample beside the earlier one it copies, with both captions and how many
hash bits apart they are. Written next to the Great Expectations Data Docs (logged to
MLflow with them); the keys are also in ``report.json``.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable
from pathlib import Path

from training.intake import shards

MAX_PAIRS = 64  # pairs shown (and listed in the report); all are counted
THUMB = 96  # px: small images upscaled (nearest) so a detail is visible


def _thumb(rec: shards.Record) -> str:
    from PIL import Image

    img = rec.image()
    scale = max(1, THUMB // max(img.size))
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_page(
    raw_shards: Iterable[Path], pairs: list[dict], total: int, policy: str, out: Path
) -> Path:
    """``pairs``: ``{"key", "earlier", "bits", "check"}`` (at most MAX_PAIRS). Reads the
    raw shards once more, stopping when every image of the pairs is found."""
    wanted = {p["key"] for p in pairs} | {p["earlier"] for p in pairs}
    found: dict[str, tuple[str, str]] = {}
    for rec in shards.read(raw_shards) if wanted else ():
        if rec.key in wanted:
            try:
                found[rec.key] = (_thumb(rec), rec.caption)
            except Exception:  # noqa: BLE001 - a picture that cannot be shown is named
                found[rec.key] = ("", rec.caption)
            if len(found) == len(wanted):
                break
    rows = []
    for p in pairs:
        cells = []
        for key in (p["earlier"], p["key"]):
            src, caption = found.get(key, ("", "?"))
            img = f'<img src="{src}">' if src else "(not shown)"
            cells.append(
                f"<td>{img}<br><code>{html.escape(key)}</code><br>{html.escape(caption)}</td>"
            )
        what = "exact copy" if p["check"] == "duplicate_image" else f"{p['bits']} bits apart"
        rows.append(f"<tr>{cells[0]}<td>{what}</td>{cells[1]}</tr>")
    shown = f"the first {len(pairs)}" if len(pairs) < total else "all"
    body = (
        "<!doctype html><meta charset='utf-8'><title>Kiln: duplicates rejected</title>"
        "<style>body{font-family:sans-serif}td{vertical-align:top;padding:6px;"
        "max-width:260px;font-size:13px}img{image-rendering:pixelated}</style>"
        f"<h1>Duplicates rejected by validate: {total}</h1>"
        f"<p>Policy <code>validate.near_duplicates: {html.escape(policy)}</code>. Each row: "
        f"the earlier sample, the distance, the rejected one; {shown} shown. "
        "To keep captioned variants of one picture, set <code>image+caption</code>; to "
        "keep near-duplicates, <code>off</code>.</p>"
        "<table><tr><th>earlier</th><th></th><th>rejected</th></tr>" + "".join(rows) + "</table>"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(body, encoding="utf-8")
    return out
