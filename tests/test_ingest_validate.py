"""Ingestion through the real img2dataset path (loopback HTTP) and the GX quality gate."""

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from training import config
from training.intake import ingest, shards, split, validate


def _params(**ingest_cfg):
    return config.resolve(
        {
            "ingest": {
                "num_samples": 60,
                "processes": 1,
                "threads": 4,
                "samples_per_shard": 25,
                **ingest_cfg,
            },
            "validate": {"samples_per_shard": 20, "val_fraction": 0.2},
        }
    )


def test_builtin_set_goes_through_img2dataset(tmp_path: Path):
    report = ingest.run(_params(), tmp_path / "raw", tmp_path / "work")
    assert report["count"] == 60 and report["successes"] == 60
    assert report["shards"] == 3
    recs = list(shards.read(shards.shard_paths(tmp_path / "raw" / "shards")))
    assert len(recs) == 60
    assert recs[0].image().size == (32, 32)
    # served from 127.0.0.1 on a random port, recorded without it (reproducible bytes)
    assert [r.meta["url"] for r in recs[:2]] == [
        "kiln://shapes/0000000.png",
        "kiln://shapes/0000001.png",
    ]
    assert json.loads(recs[0].meta["meta"])["shape"] in ("circle", "square", "triangle", "cross")
    assert not (tmp_path / "work" / "source").exists()  # rendered files cleaned up


def test_url_list_failures_are_counted_by_reason(tmp_path: Path):
    site = tmp_path / "site"
    site.mkdir()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(site / "ok.png")
    (site / "bad.png").write_bytes(b"<html>not an image</html>")
    with ingest.serve_directory(site) as base:
        pd.DataFrame(
            {
                "url": [f"{base}/ok.png", f"{base}/missing.png", f"{base}/bad.png"],
                "text": ["a red square", "gone", "html"],
            }
        ).to_parquet(tmp_path / "l.parquet")
        params = _params(
            dataset="url-list",
            source=str(tmp_path / "l.parquet"),
            caption_col="text",
            retries=0,
            allow_networks=["127.0.0.1/32"],
        )
        report = ingest.run(params, tmp_path / "raw", tmp_path / "work")
    assert report["count"] == 3 and report["successes"] == 1
    reasons = " ".join(report["failures_by_reason"])
    assert "404" in reasons
    assert sum(report["failures_by_reason"].values()) == 2


def _picture(i: int, size: int = 24) -> Image.Image:
    """A distinct textured picture per i (flat colours all share one difference hash)."""
    rng = np.random.default_rng(i)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    return coarse.resize((size, size), Image.Resampling.BICUBIC)


def _png(i, img=None):
    buf = io.BytesIO()
    (img or _picture(i)).save(buf, format="PNG")
    return buf.getvalue()


def test_quality_gate_rejects_with_reasons_and_splits_stably(tmp_path: Path):
    raw = tmp_path / "raw"
    with shards.ShardWriter(raw / "shards", "raw", 50) as w:
        for i in range(40):
            w.write(
                shards.Record(
                    f"{i:03d}",
                    _png(i),
                    "png",
                    f"sample {i}",
                    {"url": f"http://h/{i}.png"},
                )
            )
        w.write(shards.Record("dupimg", _png(0), "png", "dup", {"url": "http://h/d"}))
        near = _picture(1).resize((48, 48), Image.Resampling.BICUBIC)  # a rescaled copy
        w.write(shards.Record("near", _png(0, near), "png", "near", {"url": "http://h/n"}))
        w.write(shards.Record("empty", _png(100), "png", "   ", {"url": "http://h/e"}))
        w.write(shards.Record("dupurl", _png(101), "png", "x", {"url": "http://h/3.png"}))
        w.write(shards.Record("junk", b"not a png", "png", "junk", {"url": "http://h/j"}))
    report = validate.run(_params(dataset="url-list"), raw, tmp_path / "clean")
    rejects = pd.read_parquet(tmp_path / "clean" / "rejects.parquet").set_index("key")
    assert set(rejects.index) == {"dupimg", "near", "empty", "dupurl", "junk"}
    assert rejects.loc["near", "failed_checks"] == "near_duplicate"
    assert rejects.loc["dupimg", "failed_checks"] == "duplicate_image"
    assert "caption length" in rejects.loc["empty", "reason"]
    assert "duplicate_url" in rejects.loc["dupurl", "failed_checks"]
    assert "decoded" in rejects.loc["junk", "failed_checks"]
    assert (tmp_path / "clean" / "data_docs" / "index.html").is_file()
    assert report["train"] + report["val"] == 40 and report["rejected"] == 5
    # "sample 7": 2 words; "sample 17": 3 (CLIP's pre-tokenizer splits digits)
    assert report["caption_words"] == {"p50": 3, "p90": 3, "p95": 3, "p99": 3, "max": 3}
    assert report["caption_chars"]["p50"] == 9 and report["caption_chars"]["max"] == 9
    m = validate.metrics(report)
    assert m["caption_words_p95"] == 3.0 and m["caption_chars_max"] == 9.0
    val_keys = {r.key for r in shards.read(shards.shard_paths(tmp_path / "clean" / "val"))}
    expected = {f"{i:03d}" for i in range(40) if split.in_val(f"/{i}.png", 0.2)}
    assert val_keys == expected


def test_split_ignores_scheme_host_and_port():
    # the built-in sets are served from a random loopback port on every run
    a = split.split_key("http://127.0.0.1:41877/0000033.png", "k")
    b = split.split_key("https://mirror.example/0000033.png", "k")
    assert a == b == "/0000033.png"
    assert split.split_key("http://h/img?id=7", "k") == "/img?id=7"
    assert split.split_key("", "00000033") == "00000033"


def test_address_policy_covers_every_non_public_range():
    import ipaddress

    from training.intake import guard as fetch

    closed = fetch.Policy()
    for addr, what in [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.9", "private"),
        ("172.16.5.5", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "refused"),  # reserved (Python files it under private too)
        ("0.0.0.0", "refused"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped IPv6 is unwrapped first
        ("100.64.0.1", "non-global"),  # carrier-grade NAT
    ]:
        reason = fetch.refusal(ipaddress.ip_address(addr), closed)
        assert reason is not None and what.split("-")[0] in reason, (addr, reason)
    assert fetch.refusal(ipaddress.ip_address("93.184.216.34"), closed) is None
    opened = fetch.Policy(allow_networks=fetch.parse_networks(["10.0.0.0/8", "::1/128"]))
    assert fetch.refusal(ipaddress.ip_address("10.9.9.9"), opened) is None
    assert fetch.refusal(ipaddress.ip_address("::1"), opened) is None
    assert fetch.refusal(ipaddress.ip_address("192.168.0.1"), opened) is not None
    with pytest.raises(ValueError, match="not a CIDR"):
        fetch.parse_networks(["10.0.0.0/33"])


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("l.tsv", b"link\ttext\nhttp://h/a.png\ta red circle\nhttp://h/b.png\t\n"),
        (
            "l.jsonl",
            b'{"link": "http://h/a.png", "text": "a red circle", "extra": [1]}\n\n'
            b'{"link": "http://h/b.png", "text": null}\n',
        ),
        ("l.csv", b"link,text\nhttp://h/a.png,a red circle\n http://h/b.png ,\n"),
    ],
)
def test_url_lists_in_every_format_normalise_alike(tmp_path: Path, name: str, body: bytes):
    from training.intake import sources

    (tmp_path / name).write_bytes(body)
    n = sources.normalize_url_list(tmp_path / name, "link", "text", tmp_path / "out.parquet")
    table = pd.read_parquet(tmp_path / "out.parquet")
    assert n == 2
    assert table.url.tolist() == ["http://h/a.png", "http://h/b.png"]
    assert table.caption.tolist() == ["a red circle", ""]


def _variants_raw(raw: Path) -> None:
    """Samples 0-9, then: a rescaled copy of 1 captioned alike ("same"), a rescaled copy
    of 2 with its own caption ("variant"), an exact copy of 3 with its own caption
    ("exact") and sample 4's URL with another caption ("second")."""
    with shards.ShardWriter(raw / "shards", "raw", 50) as w:
        for i in range(10):
            w.write(shards.Record(f"{i:03d}", _png(i), "png", f"sample {i}", {"url": f"h/{i}"}))

        def near(i):
            return _png(0, _picture(i).resize((48, 48), Image.Resampling.BICUBIC))

        w.write(shards.Record("same", near(1), "png", "Sample  1", {"url": "h/s"}))
        w.write(shards.Record("variant", near(2), "png", "sample 2, smiling", {"url": "h/v"}))
        w.write(shards.Record("exact", _png(3), "png", "sample 3, waving", {"url": "h/x"}))
        # sample 4's URL again with a second caption (COCO gives a picture five)
        w.write(shards.Record("second", _png(4), "png", "sample 4, on a bench", {"url": "h/4"}))


@pytest.mark.parametrize(
    "policy, rejected",
    [
        (
            "image",
            {
                "same": "near_duplicate",
                "variant": "near_duplicate",
                "exact": "duplicate_image",
                "second": "duplicate_image, duplicate_url",
            },
        ),
        # was: "second" went as a duplicate URL whatever its caption
        ("image+caption", {"same": "near_duplicate"}),
        ("off", {"exact": "duplicate_image", "second": "duplicate_image, duplicate_url"}),
    ],
)
def test_near_duplicate_policy_and_the_pairs_page(tmp_path: Path, policy: str, rejected: dict):
    """A curated set's captioned variants are the user's call: ``image`` drops them,
    ``image+caption`` keeps them and a URL's second caption (and still drops a copy
    whose caption only differs in case and spacing), ``off`` keeps near-duplicates;
    every rejected pair is listed and shown beside the sample it copies."""
    raw = tmp_path / "raw"
    _variants_raw(raw)
    params = config.resolve(
        {
            "ingest": {"dataset": "url-list", "processes": 1, "threads": 1},
            "validate": {"near_duplicates": policy, "val_fraction": 0.3},
        }
    )
    report = validate.run(params, raw, tmp_path / "clean")
    rejects = pd.read_parquet(tmp_path / "clean" / "rejects.parquet")
    assert dict(zip(rejects.key, rejects.failed_checks, strict=True)) == rejected
    dup = report["duplicates"]
    assert dup["policy"] == policy and dup["rejected"] == len(rejected)
    earlier = {"same": "001", "variant": "002", "exact": "003", "second": "004"}
    assert {(p["key"], p["earlier"], p["check"]) for p in dup["first_pairs"]} == {
        (k, earlier[k], check.split(", ")[0]) for k, check in rejected.items()
    }
    page = (tmp_path / "clean" / dup["page"]).read_text()
    for k in rejected:
        assert f"<code>{k}</code>" in page and f"<code>{earlier[k]}</code>" in page
    assert page.count("data:image/png;base64,") == 2 * len(rejected)


def test_the_old_off_switch_says_what_replaced_it():
    with pytest.raises(config.ConfigError, match="near_duplicates: off"):
        config.resolve({"validate": {"near_duplicate_bits": None}})


def test_a_bare_off_in_the_params_file_means_off(tmp_path: Path):
    """YAML 1.1 reads ``near_duplicates: off`` as false; that was refused ("got False")."""
    path = tmp_path / "params.yaml"
    path.write_text("validate:\n  near_duplicates: off\n")
    assert config.load(path).validate_.near_duplicates == "off"
    config.set_values(path, {"validate.near_duplicates": "image"})
    config.set_values(path, {"validate.near_duplicates": "off"})  # written back bare
    assert config.load(path).validate_.near_duplicates == "off"
