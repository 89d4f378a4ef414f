"""Ingest plans a URL list in record batches (``intake/url_plan.py``).

The plan (what is fetched, what is kept, in which order) used to be made from the whole
list read into Python lists, about 450 bytes a row (430 MB at 1M rows): here its
memory is bounded on a 200k-row list, and the plan against a base holding kept, failed,
twice-fetched and removed rows is checked row by row across batch boundaries. After
img2dataset's last shard, publishing says what it does.
"""

from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import counting_server
from training import config
from training.intake import ingest, sync, url_plan
from training.intake.kinds.base import Prepared


def _params(source: Path) -> config.Params:
    return config.resolve({"ingest": {"dataset": "url-list", "source": str(source)}})


def _write(path: Path, urls: list[str], caps: list[str]) -> None:
    schema = pa.schema([("url", pa.string()), ("caption", pa.string())])
    pq.write_table(pa.table({"url": urls, "caption": caps}, schema=schema), path)


def _planning(monkeypatch, url_list: Path) -> dict:
    """Run ingest's URL-list path on ``url_list`` up to img2dataset: the fetch list it
    would hand img2dataset (or None) and the plan it would publish."""
    got: dict = {"fetch": None}

    def download(fetch_list, *args, **kwargs):
        got["fetch"] = fetch_list

    def publish(params, i2d_dir, out_dir, work_dir, extra, plan):
        got["plan"] = plan

    kind = ingest.SOURCE_KINDS["url-list"]
    monkeypatch.setattr(kind, "prepare", lambda params, work: Prepared(url_list=url_list))
    monkeypatch.setattr(ingest, "download", download)
    monkeypatch.setattr(ingest, "publish", publish)
    return got


def test_planning_a_long_list_holds_one_batch(tmp_path: Path, monkeypatch):
    n = 200_000
    lst = tmp_path / "urls.parquet"
    _write(
        lst,
        [f"http://127.0.0.1:8000/images/{i:08d}.jpg" for i in range(n)],
        [f"a picture of thing number {i}" for i in range(n)],
    )
    got = _planning(monkeypatch, lst)
    work = tmp_path / "work"
    work.mkdir()
    tracemalloc.start()
    try:
        ingest._ingest(_params(lst), tmp_path / "raw", work)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got["plan"].counts()["new"] == n and pq.read_metadata(got["fetch"]).num_rows == n
    # the whole list as Python lists peaked at 58 MB here; a 20k-row batch at 9 MB
    assert peak < 30 * 2**20, f"planning peaked at {peak / 2**20:.0f} MB of Python objects"


def _base(raw: Path, params: config.Params, shards: dict[str, list[tuple[str, str]]]) -> None:
    """A base in ``raw`` as ingest leaves it, as far as planning reads it: its report's
    fetch fingerprint and each shard's parquet (key, status, row_id)."""
    (raw / "shards").mkdir(parents=True)
    (raw / "report.json").write_text(
        json.dumps({"fetch_fingerprint": sync.fetch_fingerprint(params)})
    )
    for shard, rows in shards.items():
        keys = [f"{int(shard):05d}{i:04d}" for i in range(len(rows))]
        status = [s for s, _ in rows]
        table = {"key": keys, "status": status, "row_id": [r for _, r in rows]}
        pq.write_table(pa.table(table), raw / "shards" / f"{shard}.parquet")


@pytest.mark.parametrize("batch", [3, 20_000])
def test_the_plan_is_that_of_the_whole_list(tmp_path: Path, monkeypatch, batch: int):
    monkeypatch.setattr(url_plan, "BATCH_ROWS", batch)
    row = {n: (f"http://127.0.0.1:9/{n}.jpg", f"picture {n}") for n in "abcdefgh"}
    rid = {n: sync.url_row_id(*row[n]) for n in row}
    lst, raw = tmp_path / "urls.parquet", tmp_path / "raw"
    params = _params(lst)
    ok, failed = "success", "failed_to_download"
    _base(
        raw,
        params,
        {
            "00000": [(ok, rid["a"]), (ok, rid["b"]), (failed, rid["c"]), (ok, rid["d"])],
            "00001": [(ok, rid["e"]), (ok, rid["e"]), (ok, rid["f"])],
        },
    )
    # b kept; g new; e kept; c failed last time; e kept again; e a third time: fetched;
    # h new; f kept; b a second time: fetched. a and d left the list.
    names = list("bgeceehfb")
    _write(lst, [row[n][0] for n in names], [row[n][1] for n in names])
    got = _planning(monkeypatch, lst)
    (tmp_path / "work").mkdir()
    ingest._ingest(params, raw, tmp_path / "work")

    plan = got["plan"]
    fetched = [names[i] for i in (1, 3, 5, 6, 8)]  # g c e h b, in the list's order
    assert pq.read_table(got["fetch"]).to_pydict() == {
        "url": [row[n][0] for n in fetched],
        "caption": [row[n][1] for n in fetched],
        "row_id": [rid[n] for n in fetched],
    }
    assert plan.keep == {"00000": {"000000001"}, "00001": {"000010000", "000010001", "000010002"}}
    assert plan.counts() == {"new": 4, "retried": 1, "kept": 4, "removed": 2}
    assert (plan.rows, plan.next_shard, plan.full) == ({"00000": 4, "00001": 3}, 2, None)
    # the same plan as matching the whole list at once (a served source's way)
    whole = sync.plan(params, raw, [rid[n] for n in names])
    assert [names[i] for i in whole.fetch] == fetched
    assert (whole.keep, whole.counts()) == (plan.keep, plan.counts())


def test_nothing_to_fetch_writes_no_fetch_list(tmp_path: Path, monkeypatch):
    lst, raw = tmp_path / "urls.parquet", tmp_path / "raw"
    params = _params(lst)
    row = ("http://127.0.0.1:9/a.jpg", "picture a")
    _write(lst, [row[0]], [row[1]])
    _base(raw, params, {"00000": [("success", sync.url_row_id(*row))]})
    got = _planning(monkeypatch, lst)
    (tmp_path / "work").mkdir()
    ingest._ingest(params, raw, tmp_path / "work")
    assert got["fetch"] is None and got["plan"].counts()["kept"] == 1
    assert not (tmp_path / "work" / "fetch.parquet").exists()


def test_publishing_says_what_it_does_after_the_last_shard(tmp_path: Path, capfd):
    """Between img2dataset's last shard and the final count, ingest rewrites the new
    shards, links the kept ones and re-reads every shard for the rejects: said."""
    img = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(img, format="PNG")
    lst = tmp_path / "urls.parquet"
    with counting_server({"/0.png": img.getvalue()}) as base:
        _write(lst, [f"{base}/0.png", f"{base}/gone.png"], ["a red square", "nothing"])
        params = config.resolve(
            {
                "ingest": {
                    "dataset": "url-list",
                    "source": str(lst),
                    "processes": 1,
                    "threads": 2,
                    "retries": 0,
                    "allow_networks": ["127.0.0.1/32"],
                }
            }
        )
        capfd.readouterr()
        ingest.run(params, tmp_path / "raw", tmp_path / "work")
    said = [line for line in capfd.readouterr().err.splitlines() if "[kiln]" in line]
    assert said[-4:] == [
        "[kiln] ingest: publishing 1 new shard(s) in key order, 0 kept",
        "[kiln] ingest: listing the rows that did not land, from 1 shard(s)",
        "[kiln] ingest: 1/2 images in 1 shards",
        "[kiln] ingest:        1  HTTP Error 404",
    ], said
