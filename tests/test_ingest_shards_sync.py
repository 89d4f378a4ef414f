"""A shards source that gained a shard: a sync downloads and unpacks that shard only.

The shards were unpacked into ingest's work folder, which goes when an ingest publishes:
every sync downloaded (remote tars) and unpacked every shard of the collection again to
fetch the rows of the one that was new. The unpacked shards are now kept beside the work
folder; a local tar rewritten in place is unpacked again.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from tests.conftest import CountingImages, counting_server
from training import config
from training.intake import ingest, shards


def _png(i: int) -> bytes:
    rng = np.random.default_rng(700 + i)
    img = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((36, 36))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _tar(shard: int, per: int = 3, word: str = "picture") -> bytes:
    buf = io.BytesIO()
    with wds.TarWriter(buf) as w:
        for j in range(per):
            i = shard * per + j
            w.write({"__key__": f"{j:03d}", "png": _png(i), "txt": f"shard {word} {i}"})
    return buf.getvalue()


def _params(source: str) -> config.Params:
    return config.resolve(
        {
            "ingest": {
                "dataset": "shards",
                "source": source,
                "processes": 1,
                "threads": 4,
                "samples_per_shard": 10,
                "allow_networks": ["127.0.0.1/32"],
            }
        }
    )


def _captions(raw: Path) -> list[str]:
    return sorted(r.caption for r in shards.read(shards.shard_paths(raw / "shards")))


def test_a_sync_downloads_only_the_new_remote_shard(tmp_path: Path):
    tars = {f"/part-{s}.tar": _tar(s) for s in range(3)}
    raw, work = tmp_path / "raw", tmp_path / "work"
    with counting_server(tars) as base:
        ingest.run(_params(base + "/part-{0..1}.tar"), raw, work)
        assert sum(CountingImages.hits.values()) == 2
        CountingImages.hits.clear()
        report = ingest.run(_params(base + "/part-{0..2}.tar"), raw, work)
        # was: all three tars downloaded again for the three rows of part-2
        assert dict(CountingImages.hits) == {"/part-2.tar": 1}
    assert (report["rows_new"], report["rows_kept"]) == (3, 6)
    assert _captions(raw) == sorted(f"shard picture {i}" for i in range(9))


def test_a_local_shard_rewritten_in_place_is_unpacked_again(tmp_path: Path):
    src = tmp_path / "wds"
    src.mkdir()
    for s in range(2):
        (src / f"part-{s}.tar").write_bytes(_tar(s))
    raw, work = tmp_path / "raw", tmp_path / "work"
    params = _params(str(src / "part-*.tar"))
    ingest.run(params, raw, work)
    (src / "part-1.tar").write_bytes(_tar(1, word="photo"))
    st = (src / "part-1.tar").stat()
    os.utime(src / "part-1.tar", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    report = ingest.run(params, raw, work)
    assert (report["rows_new"], report["rows_kept"], report["rows_removed"]) == (3, 3, 3)
    want = [f"shard picture {i}" for i in range(3)] + [f"shard photo {i}" for i in range(3, 6)]
    assert _captions(raw) == sorted(want)
