"""A real image collection for tests and benchmarks: Twemoji, fetched from npm when used.

Kiln's built-in sets are synthetic; this is real, human-drawn clip art with free-text
captions, the kind of folder a user brings. Nothing of it is committed: the two npm
packages are downloaded from the registry (pinned versions, checked against the
registry's sha512) into a cache directory and turned into a folder of PNGs with
sidecar ``.txt`` captions, which Kiln ingests as ``ingest.dataset: folder``.

* Images: ``emoji-datasource-twitter`` 16.0.0, ``img/twitter/64/``: 3,786 Twemoji at
  64x64 px, RGBA on a transparent background (3,700+ with skin-tone variants).
  Twemoji graphics: copyright Twitter, Inc. and other contributors, licensed CC-BY 4.0
  (https://creativecommons.org/licenses/by/4.0/); the package itself is MIT.
* Captions: ``emojibase-data`` 17.0.0 (MIT), ``en/data.json``: each emoji's
  human-written CLDR name, group and subgroup, and keywords, e.g. "man rowing boat:
  light skin tone. people & body, sport. boat, canoe, cruise, fishing, lake, ...".
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import tarfile
import urllib.request
from pathlib import Path

PACKAGES: dict[str, tuple[str, str]] = {  # name: (version, the tarball's sha512, base64)
    "emoji-datasource-twitter": (
        "16.0.0",
        "7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
    ),
    "emojibase-data": (
        "17.0.0",
        "Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA==",
    ),
}
REGISTRY = "https://registry.npmjs.org"
LICENCE = (
    "Twemoji graphics (c) Twitter, Inc. and other contributors, CC-BY 4.0; "
    "captions from emojibase-data (MIT)"
)


def cache_dir() -> Path:
    """Where the tarballs are kept between runs (``KILN_TEST_DATA``, else ~/.cache)."""
    root = os.environ.get("KILN_TEST_DATA") or Path.home() / ".cache" / "kiln-test-data"
    return Path(root)


def package(name: str) -> Path:
    """The npm tarball of ``name`` at its pinned version, downloaded once and checked."""
    version, integrity = PACKAGES[name]
    dest = cache_dir() / f"{name}-{version}.tgz"
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(f"{REGISTRY}/{name}/{version}", timeout=60) as r:
        dist = json.load(r)["dist"]
    expected = integrity
    if dist["integrity"].removeprefix("sha512-") != expected:
        raise RuntimeError(f"{name}@{version}: the registry's checksum changed")
    with urllib.request.urlopen(dist["tarball"], timeout=300) as r:
        data = r.read()
    if base64.b64encode(hashlib.sha512(data).digest()).decode() != expected:
        raise RuntimeError(f"{name}@{version}: the download does not match its sha512")
    tmp = dest.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(dest)
    return dest


def _member(tgz: Path, name: str) -> bytes:
    with tarfile.open(tgz, "r:gz") as tf:
        f = tf.extractfile(f"package/{name}")
        assert f is not None, name
        return f.read()


def _key(hexcode: str) -> str:
    """Emojibase and emoji-datasource spell some codes with or without FE0F."""
    return "-".join(p for p in hexcode.upper().split("-") if p != "FE0F")


def captions() -> dict[str, str]:
    """Caption per emoji code point sequence (``_key`` form), skin-tone variants too."""
    tgz = package("emojibase-data")
    data = json.loads(_member(tgz, "en/data.json"))
    msgs = json.loads(_member(tgz, "en/messages.json"))
    groups = {g["order"]: g["message"] for g in msgs["groups"]}
    subgroups = {g["order"]: g["message"] for g in msgs["subgroups"]}
    out: dict[str, str] = {}
    for e in data:
        where = ", ".join(
            x for x in (groups.get(e.get("group")), subgroups.get(e.get("subgroup"))) if x
        )
        tags = ", ".join(e.get("tags") or [])
        for v in [e, *(e.get("skins") or [])]:
            parts = [v["label"], where, tags]
            out[_key(v["hexcode"])] = ". ".join(p for p in parts if p)
    return out


def emoji_folder(dest: Path, limit: int | None = None, seed: int = 0) -> Path:
    """Write Twemoji PNGs (64 px, transparent) with ``.txt`` captions into ``dest``:
    all of them, or a seeded sample of ``limit``. Emoji without a caption are left out."""
    caps = captions()
    tgz = package("emoji-datasource-twitter")
    with tarfile.open(tgz, "r:gz") as tf:
        members = [
            m
            for m in tf.getmembers()
            if m.isfile()
            and m.name.startswith("package/img/twitter/64/")
            and _key(Path(m.name).stem) in caps
        ]
        members.sort(key=lambda m: m.name)
        if limit is not None and limit < len(members):
            members = sorted(random.Random(seed).sample(members, limit), key=lambda m: m.name)
        dest.mkdir(parents=True, exist_ok=True)
        for m in members:
            stem = Path(m.name).stem
            f = tf.extractfile(m)
            assert f is not None
            (dest / f"{stem}.png").write_bytes(f.read())
            (dest / f"{stem}.txt").write_text(caps[_key(stem)] + "\n", encoding="utf-8")
    (dest / "LICENCE.txt").write_text(LICENCE + "\n", encoding="utf-8")
    return dest


def is_transparent(png: bytes) -> bool:
    from PIL import Image

    img = Image.open(io.BytesIO(png))
    return img.mode in ("RGBA", "LA") or "transparency" in img.info
