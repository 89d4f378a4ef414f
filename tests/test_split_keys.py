"""A source row is known by a stable name: a presigned URL's signature and a shard's
spelling change neither whether it is fetched again nor its side of the train/val split.

The bug: the split key and the row id took a URL with its whole query, and a shard's
unpack folder (part of its samples' ids and keys) digested the path as written. A URL
list re-signed for each run (``X-Amz-Signature``...) was fetched again in full and about
9% of its samples changed side; so were the samples of a shard named ``./wds/a.tar``
one run and ``wds/a.tar`` (or its absolute path) the next.

And the guard the other way: a name with nothing volatile in it keys exactly as before
(values pinned from the code before the fix), so no sample already split moves.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import webdataset as wds

from tests.conftest import CountingImages, counting_server
from tests.test_ingest_sync import _jpeg, _params  # the incremental-ingest fixtures
from training import config
from training.intake import ingest, shards, sources, split, sync, validate
from training.intake.canonical import shard_spelling, unsigned_url

# ---- names that were already stable key as before --------------------------------------

# (url, split_hash(split_key(url, "k")), url_row_id(url, "a cat")), by the code before
# the fix: continuous training depends on these never moving
PINNED_URLS = [
    ("https://cdn.example.com/img/0000033.jpg", 3556383001, "dfe84308f2c59765381cffb6"),
    ("https://cdn.example.com/img?id=17", 819363480, "2fdadbe8f9c6f98c6af7ac44"),
    ("https://cdn.example.com/img?id=17&size=large", 2321656412, "b515e347d3a2a7350e9f86f4"),
    ("kiln://shapes/0000012.png", 2825771557, "804d4edba595f873328fa80c"),
    ("http://127.0.0.1:41877/0000033.png", 1534654507, "6898dd50f777ccc289351487"),
    ("https://h.example/a%20b.jpg?x=1&y=2#frag", 1879489213, "f7c23f5863ee61ffd649b84f"),
    # look like signing parameters, but without their scheme's signature beside them
    ("https://h.example/p.jpg?Signature=abc&id=3", 2425047015, "9ebe8e81d5901e5929912e5e"),
    ("https://h.example/p.jpg?sig=x&st=2&sp=r", 316222151, "0839b28a39bfe7b6f9d3c08d"),
    ("https://h.example/p.jpg?Expires=99", 2815655122, "1c410efb4a955879eae5faec"),
    ("https://h.example/p.jpg?a=1&&b=2", 2712853515, "05b87aefaa3b5eed92ae20a7"),
    ("https://h.example/p.jpg?", 3647787956, "c5f8ca28dc9233f408f5b6e6"),
]
PINNED_KEYS = [("00000033", 3783056197), ("000123456", 3002649044)]
# shard as written -> its unpack folder, by the code before the fix
PINNED_SHARDS = [
    ("data/wds/part-0001.tar", "part-0001.tar-9e0542821c39"),
    ("/data/laion/00042.tar", "00042.tar-312655ef9b36"),
    ("https://shards.example.com/wds/part-0003.tar", "part-0003.tar-5ea21bffee6e"),
    ("https://shards.example.com/wds/part-0003.tar?id=4", "part-0003.tar_id_4-3e363559ff69"),
    ("../elsewhere/part-7.tar", "part-7.tar-335dac706974"),
]


@pytest.mark.parametrize(("url", "place", "row_id"), PINNED_URLS)
def test_a_url_without_a_signature_keys_as_before(url: str, place: int, row_id: str):
    assert unsigned_url(url) == url
    assert split.split_hash(split.split_key(url, "k")) == place
    assert sync.url_row_id(url, "a cat") == row_id


def test_sample_keys_and_ordinary_shard_paths_key_as_before(tmp_path: Path, monkeypatch):
    for key, place in PINNED_KEYS:
        assert split.split_hash(split.split_key("", key)) == place
    monkeypatch.chdir(tmp_path)  # none of the absolute paths lies under it
    for shard, folder in PINNED_SHARDS:
        assert sources.shard_folder(shard) == folder


# ---- volatile names ---------------------------------------------------------------------

# one picture's URL signed twice by each scheme (the second time in other letter case):
# (first, second, the name both stand for)
SIGNED = {
    "s3-sigv4": (
        "https://b.s3.amazonaws.com/k/a.jpg?id=17&X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIA%2F20250101%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20250101T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host"
        "&X-Amz-Security-Token=tok1&X-Amz-Signature=aaaa",
        "https://b.s3.amazonaws.com/k/a.jpg?x-amz-algorithm=AWS4-HMAC-SHA256"
        "&x-amz-credential=AKIB&x-amz-date=20250202T000000Z&x-amz-expires=3600"
        "&x-amz-signedheaders=host&x-amz-signature=bbbb&id=17",
        "https://b.s3.amazonaws.com/k/a.jpg?id=17",
    ),
    "s3-sigv2": (
        "https://b.s3.amazonaws.com/a.jpg?AWSAccessKeyId=AKIA&Expires=1700000000&Signature=x%3D",
        "https://b.s3.amazonaws.com/a.jpg?awsaccesskeyid=AKIB&expires=1800000000&signature=y",
        "https://b.s3.amazonaws.com/a.jpg",
    ),
    "gcs-v4": (
        "https://storage.googleapis.com/b/a.jpg?X-Goog-Algorithm=GOOG4-RSA-SHA256"
        "&X-Goog-Credential=sa%40p.iam&X-Goog-Date=20250101T000000Z&X-Goog-Expires=900"
        "&X-Goog-SignedHeaders=host&X-Goog-Signature=0a0a",
        "https://storage.googleapis.com/b/a.jpg?X-GOOG-DATE=20250303T000000Z"
        "&X-GOOG-SIGNATURE=1b1b&X-GOOG-ALGORITHM=GOOG4-RSA-SHA256",
        "https://storage.googleapis.com/b/a.jpg",
    ),
    "cloudfront": (
        "https://d1.cloudfront.net/a.jpg?v=2&Expires=1700000000&Signature=s1&Key-Pair-Id=K1",
        "https://d1.cloudfront.net/a.jpg?v=2&Policy=eyJ9&Signature=s2&Key-Pair-Id=K2",
        "https://d1.cloudfront.net/a.jpg?v=2",
    ),
    "azure-sas": (
        "https://acc.blob.core.windows.net/c/a.jpg?sv=2022-11-02&ss=b&srt=o&sp=r"
        "&se=2025-01-01T00:00:00Z&st=2024-12-31T00:00:00Z&spr=https&sig=AbC%3D",
        "https://acc.blob.core.windows.net/c/a.jpg?sp=r&st=2025-02-01&se=2025-02-02"
        "&skoid=o&sktid=t&skt=1&ske=2&sks=b&skv=2022-11-02&sv=2022-11-02&sr=b&sig=DeF",
        "https://acc.blob.core.windows.net/c/a.jpg",
    ),
}


@pytest.mark.parametrize("scheme", sorted(SIGNED))
def test_a_presigned_url_keys_without_its_signature(scheme: str):
    first, second, name = SIGNED[scheme]
    assert unsigned_url(first) == unsigned_url(second) == name
    assert split.split_key(first, "k") == split.split_key(second, "k")
    assert split.split_key(first, "k") == split.split_key(name, "k")
    assert sync.url_row_id(first, "c") == sync.url_row_id(second, "c") == sync.url_row_id(name, "c")


def test_other_query_parameters_still_tell_pictures_apart():
    a = "https://b.s3.amazonaws.com/img?id=1&X-Amz-Signature=s&X-Amz-Date=d#part"
    b = "https://b.s3.amazonaws.com/img?id=2&X-Amz-Signature=s&X-Amz-Date=d#part"
    assert unsigned_url(a) == "https://b.s3.amazonaws.com/img?id=1#part"
    assert split.split_key(a, "k") != split.split_key(b, "k")
    assert sync.url_row_id(a, "c") != sync.url_row_id(b, "c")


def test_one_shard_in_any_spelling_is_one_shard(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    same = {
        sources.shard_folder(s)
        for s in (
            "wds/a.tar",
            "./wds/a.tar",
            "wds//a.tar",
            "wds/x/../a.tar",
            str(tmp_path / "wds/a.tar"),
        )
    }
    assert same == {sources.shard_folder("wds/a.tar")}
    assert shard_spelling(str(tmp_path / "wds/a.tar")) == "wds/a.tar"
    signed = "https://h.example/wds/a.tar?X-Amz-Date=1&X-Amz-Signature={}"
    assert sources.shard_folder(signed.format("a")) == sources.shard_folder(signed.format("b"))
    assert sources.shard_folder("wds/a.tar") != sources.shard_folder("wds/b.tar")


# ---- end to end: a second ingest fetches nothing and splits the same --------------------
def _split_of(params: config.Params, raw: Path, clean: Path) -> dict[str, str]:
    """caption -> "train" or "val" after validating ``raw`` into ``clean``."""
    validate.run(params, raw, clean)
    return {
        r.caption: side
        for side in ("train", "val")
        for r in shards.read(shards.shard_paths(clean / side))
    }


def _signed(i: int, run: int) -> str:
    """Picture ``i``'s path and query, presigned for ingest ``run``: ``id`` names the
    picture, the rest changes every time it is signed."""
    return (
        f"/img?id={i}&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA{run}"
        f"&X-Amz-Date=2025010{run}T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host"
        f"&X-Amz-Signature={run:064x}"
    )


def test_a_re_signed_url_list_is_not_fetched_again_nor_split_again(tmp_path: Path):
    n = 20
    images = {_signed(i, run): _jpeg(i) for i in range(n) for run in (1, 2)}
    raw, work, lst = tmp_path / "raw", tmp_path / "work", tmp_path / "list.parquet"
    params = _params(dataset="url-list", source=str(lst))
    with counting_server(images) as base:
        for run in (1, 2):
            urls = [base + _signed(i, run) for i in range(n)]
            caps = [f"picture {i}" for i in range(n)]
            pd.DataFrame({"url": urls, "caption": caps}).to_parquet(lst)
            report = ingest.run(params, raw, work)
            split_now = _split_of(params, raw, tmp_path / f"clean{run}")
            if run == 1:
                assert report["successes"] == n
                first_split = split_now
    assert (report["rows_new"], report["rows_kept"], report["rows_removed"]) == (0, n, 0)
    assert not any(CountingImages.hits[_signed(i, 2)] for i in range(n))  # nothing fetched
    assert split_now == first_split and len(split_now) == n
    assert "val" in split_now.values() and "train" in split_now.values()
    # what ingest records (pushed to a DVC remote, read into reports) carries no
    # signature or credential: were recorded as fetched, X-Amz-Credential included
    recorded = [u for p in raw.rglob("*.parquet") for u in pd.read_parquet(p)["url"]]
    recorded += [r.meta["url"] for r in shards.read(sorted(raw.rglob("*.tar")))]
    assert len(recorded) >= 2 * n and all(u.startswith(base) for u in recorded)
    assert not [u for u in recorded if "x-amz-" in u.lower()]
    assert {u.partition("?")[2] for u in recorded} == {f"id={i}" for i in range(n)}


def test_a_shard_spelled_another_way_is_not_fetched_again_nor_split_again(
    tmp_path: Path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"part-{s}.tar")) as w:
            for j in range(6):
                w.write({"__key__": f"{j:03d}", "jpg": _jpeg(6 * s + j), "txt": f"pic {6 * s + j}"})
    (tmp_path / "wds").mkdir()
    for s in range(2):
        (tmp_path / f"part-{s}.tar").rename(tmp_path / "wds" / f"part-{s}.tar")
    raw, work = tmp_path / "raw", tmp_path / "work"
    splits, reports = [], []
    for spec in ("wds/part-{0..1}.tar", "./wds/part-*.tar", str(tmp_path / "wds/part-{0..1}.tar")):
        p = _params(dataset="shards", source=spec)
        reports.append(ingest.run(p, raw, work))
        splits.append(_split_of(p, raw, tmp_path / f"clean{len(splits)}"))
    assert reports[0]["successes"] == 12
    for report in reports[1:]:
        assert (report["rows_new"], report["rows_kept"], report["rows_removed"]) == (0, 12, 0)
    assert splits[0] == splits[1] == splits[2] and set(splits[0].values()) == {"train", "val"}


def test_a_re_signed_remote_shard_is_not_fetched_again(tmp_path: Path):
    (tmp_path / "wds").mkdir()
    with wds.TarWriter(str(tmp_path / "wds" / "part-0.tar")) as w:
        for j in range(6):
            w.write({"__key__": f"{j:03d}", "jpg": _jpeg(j), "txt": f"pic {j}"})
    raw, work = tmp_path / "raw", tmp_path / "work"
    with ingest.serve_directory(tmp_path / "wds") as base:  # the stdlib server ignores queries
        for run in (1, 2):
            spec = f"{base}/part-0.tar?X-Amz-Date=2025010{run}T000000Z&X-Amz-Signature={run}"
            report = ingest.run(_params(dataset="shards", source=spec), raw, work)
    assert (report["rows_new"], report["rows_kept"], report["rows_removed"]) == (0, 6, 0)
