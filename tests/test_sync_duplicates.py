"""An edited caption of a picture that has a copy elsewhere in the folder: a sync puts
the re-fetched row after the copy, and validate, keeping the first copy it read, used
to reject the edit as a duplicate of the copy, train the copy's old caption and move
the picture to the copy's side of the split (train <-> val). The edit now wins as it
does in a from-scratch ingest of the same folder (``intake/precedence.py``)."""

from __future__ import annotations

from pathlib import Path

from tests.test_ingest_sync import _jpeg, _params, _picture_folder, _sides
from training.intake import ingest, split


def _name_on(side: str, stem: str) -> str:
    """A file name starting with ``stem`` whose split key lands on ``side``."""
    return next(
        f"{stem}{n}"
        for n in range(200)
        if ("val" if split.in_val(f"/{stem}{n}.jpg", 0.3) else "train") == side
    )


def test_an_edited_caption_beats_its_copy_and_keeps_its_side(tmp_path: Path):
    src, raw = _picture_folder(tmp_path), tmp_path / "raw"
    # two pictures, each with a copy under a later name on the other side of the split
    twins = {}
    for i, side in ((20, "train"), (21, "val")):
        first = _name_on(side, "a")
        copy = _name_on("val" if side == "train" else "train", "z")
        for name, caption in ((first, f"picture {i}"), (copy, f"copy of {i}")):
            (src / f"{name}.jpg").write_bytes(_jpeg(i))
            (src / f"{name}.txt").write_text(caption)
        twins[i] = (first, side)
    params = _params(dataset="folder", source=str(src))
    ingest.run(params, raw, tmp_path / "work")
    before = _sides(params, raw, tmp_path / "clean1")
    assert before["picture 20"] == "train" and before["picture 21"] == "val"
    assert "copy of 20" not in before and "copy of 21" not in before

    for i, (first, _) in twins.items():
        (src / f"{first}.txt").write_text(f"picture {i}, captioned anew")
    report = ingest.run(params, raw, tmp_path / "work")
    assert (report["rows_new"], report["rows_removed"]) == (2, 2)
    after = _sides(params, raw, tmp_path / "clean2")
    assert after["picture 20, captioned anew"] == "train"
    assert after["picture 21, captioned anew"] == "val"
    assert "copy of 20" not in after and "copy of 21" not in after
    assert {c: s for c, s in after.items() if c.startswith("picture ") and "," not in c} == {
        f"picture {i}": before[f"picture {i}"] for i in range(8)
    }
