"""The internet's worst, served from loopback: every bad input is counted with its reason,
the good data lands intact, and the run finishes. Runs the real `kiln ingest` command
(standalone, --url-list/--out/--allow-network) and the real quality gate."""

from __future__ import annotations

import http.server
import io
import ipaddress
import os
import ssl
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from training import config
from training.intake import shards, validate


class Backlog128(http.server.ThreadingHTTPServer):
    """A loopback server whose backlog holds many clients connecting at once (was: set
    on the stdlib class itself, for every later server of the worker process)."""

    request_queue_size = 128


ROOT = Path(__file__).resolve().parents[1]
STOP = threading.Event()


def _picture(i: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(1000 + i)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    return coarse.resize((size, size), Image.Resampling.BICUBIC)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb() -> bytes:
    """A valid PNG header declaring 60000 x 60000 pixels (10.8 GB decoded)."""
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1000)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _exif_rotated() -> bytes:
    """Upright is 20 wide x 40 tall, red on top, blue below; stored turned on its side
    with EXIF orientation 6 ("rotate 90 clockwise to view")."""
    upright = Image.new("RGB", (20, 40), (230, 20, 20))
    upright.paste((20, 20, 230), (0, 20, 20, 40))
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def _palette_transparent() -> bytes:
    img = Image.new("P", (40, 40), 0)
    img.putpalette([0, 0, 0, 20, 20, 230] + [0] * 762)
    img.paste(1, (20, 0, 40, 40))  # right half blue, left half index 0 = transparent
    return _encode(img, "PNG", transparency=0)


def _animated() -> bytes:
    frames = [Image.new("RGB", (40, 40), c) for c in ((20, 200, 20), (200, 20, 20))]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def _gray16() -> bytes:
    return _encode(Image.fromarray(np.full((40, 40), 32896, dtype=np.uint16)), "PNG")


GOOD = {f"/good/{i}.png": _encode(_picture(i), "PNG") for i in range(12)}
BODIES = {
    **GOOD,
    "/html.png": b"<!DOCTYPE html><html><body>not found</body></html>",
    "/empty.png": b"",
    "/trunc.jpg": _encode(_picture(50, 200), "JPEG", quality=90)[:3000],
    "/trunc.png": _encode(_picture(51, 200), "PNG")[:2000],
    "/bomb.png": _bomb(),
    "/cmyk.jpg": _encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG", quality=95),
    "/gray16.png": _gray16(),
    "/palette.png": _palette_transparent(),
    "/anim.gif": _animated(),
    "/exif.jpg": _exif_rotated(),
    "/big.png": _encode(
        Image.fromarray(np.random.default_rng(9).integers(0, 256, (300, 300, 3), dtype=np.uint8)),
        "PNG",
    ),
}


class Handler(http.server.BaseHTTPRequestHandler):
    hits = 0

    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, body: bytes = b"", ctype: str = "image/png", length=True) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        type(self).hits += 1
        p = self.path
        if p == "/404":
            return self._send(404, b"no")
        if p == "/500":
            return self._send(500, b"boom")
        if p == "/stall":  # accepts, never answers
            STOP.wait(30)
            return None
        if p == "/stall-body":  # headers and 100 bytes, then nothing
            self.send_response(200)
            self.send_header("Content-Length", "5000")
            self.end_headers()
            self.wfile.write(GOOD["/good/0.png"][:100])
            self.wfile.flush()
            STOP.wait(30)
            return None
        if p == "/drip":  # one byte every 0.2 s: each read is quick, the whole is not
            self.send_response(200)
            self.end_headers()
            try:
                for b in GOOD["/good/1.png"]:
                    if STOP.wait(0.2):
                        return None
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
            except OSError:  # the client gave up, as it should
                pass
            return None
        if p == "/big-chunked.png":  # no Content-Length: only the byte count can stop it
            return self._send(200, BODIES["/big.png"], length=False)
        if p.startswith("/redirect"):
            target = {
                "/redirect-private": "http://10.0.0.1/x.png",
                "/redirect-file": "file:///etc/hostname",
                "/redirect-loop": "/redirect-loop",
                "/redirect-ok": "/good/11.png",
            }[p]
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if p in BODIES:
            ctype = "image/png"  # html served as image/png included
            return self._send(200, BODIES[p], ctype)
        return self._send(404, b"no")


@pytest.fixture(scope="module")
def server():
    STOP.clear()
    srv = Backlog128(("127.0.0.1", 0), Handler)  # 24 clients connect at once
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", srv.server_address[1]
    STOP.set()
    srv.shutdown()
    srv.server_close()


def _test_ca(d: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate it signed for 127.0.0.1, made here and now (no
    key is ever committed): (ca.pem, cert.pem, key.pem)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(2)]
    names = [
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, n)])
        for n in ("kiln test CA", "127.0.0.1")
    ]

    def cert(i: int, ext: list[tuple[object, bool]]) -> x509.Certificate:
        b = x509.CertificateBuilder().subject_name(names[i]).issuer_name(names[0])
        b = b.public_key(keys[i].public_key()).serial_number(x509.random_serial_number())
        b = b.not_valid_before(now - datetime.timedelta(hours=1))
        b = b.not_valid_after(now + datetime.timedelta(days=1))
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(keys[i].public_key()), False)
        for e, critical in ext:
            b = b.add_extension(e, critical)
        return b.sign(keys[0], hashes.SHA256())

    ku = dict(content_commitment=False, data_encipherment=False, encipher_only=False)
    ku |= dict(decipher_only=False, key_agreement=False, crl_sign=True)
    ca = cert(
        0,
        [
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (
                x509.KeyUsage(
                    digital_signature=False, key_encipherment=False, key_cert_sign=True, **ku
                ),
                True,
            ),
        ],
    )
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(keys[0].public_key())
    leaf = cert(
        1,
        [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                False,
            ),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            (aki, False),
        ],
    )
    pem = serialization.Encoding.PEM
    paths = d / "ca.pem", d / "cert.pem", d / "key.pem"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(leaf.public_bytes(pem))
    fmt, none = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    paths[2].write_bytes(keys[1].private_bytes(pem, fmt, none))
    return paths


@pytest.fixture
def tls_server(tmp_path: Path, monkeypatch):
    """The same handler over https, its certificate trusted for this test only: the
    guard builds the default context, which reads SSL_CERT_FILE (verification stays on)."""
    ca, cert, key = _test_ca(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _kiln(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "training.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _write_params(d: Path) -> None:
    (d / "params.yaml").write_text(
        "ingest:\n  dataset: url-list\n  timeout_s: 1\n  deadline_s: 3.0\n  retries: 0\n"
        "  processes: 1\n"
        "  threads: 24\n  max_bytes: 65536\n  samples_per_shard: 20\n"
        "validate:\n  val_fraction: 0.3\n"
    )


def test_bad_inputs_are_counted_with_reasons_and_good_data_lands(server, tmp_path: Path):
    base, port = server
    rows: list[tuple[str, bytes, str | None]] = []  # url, caption bytes, expected reason
    for i, path in enumerate(GOOD):
        if i < 11:
            rows.append((base + path, f"good picture {i}".encode(), None))
    expected_ingest = {
        "/404": "HTTP Error 404",
        "/500": "HTTP Error 500",
        "/stall": "timed out",
        "/stall-body": "timed out",
        "/drip": "total deadline exceeded",
        "/html.png": "not an image (html)",
        "/empty.png": "empty body",
        "/trunc.jpg": "truncated or corrupt image",
        "/trunc.png": "truncated or corrupt image",
        "/bomb.png": "decompression bomb",
        "/big.png": "larger than max_bytes",
        "/big-chunked.png": "larger than max_bytes",
        "/redirect-private": "refused: private address",
        "/redirect-file": "refused: redirect to a non-http(s) scheme",
        "/redirect-loop": "too many redirects",
    }
    for path, why in expected_ingest.items():
        rows.append((base + path, path.encode(), why))
    for url, why in {
        f"http://127.0.0.2:{port}/good/3.png": "refused: loopback address",
        f"http://[::1]:{port}/good/3.png": "refused: loopback address",
        "http://169.254.169.254/latest/meta-data/": "refused: link-local address",
        "http://10.1.2.3/x.png": "refused: private address",
        "file:///etc/hostname": "refused: scheme 'file'",
        "ftp://example.com/x.png": "refused: scheme 'ftp'",
        "data:image/png;base64,iVBORw0KGgo=": "refused: scheme 'data'",
        "not a url": "refused: scheme 'missing'",
        "http://": "malformed URL",
        "http://[::1": "malformed URL",
    }.items():
        rows.append((url, b"ssrf or malformed", why))
    # formats that must land, converted correctly
    converted = [
        "/cmyk.jpg",
        "/gray16.png",
        "/palette.png",
        "/anim.gif",
        "/exif.jpg",
        "/redirect-ok",
    ]
    for path in converted:
        rows.append((base + path, f"converted {path}".encode(), None))
    # captions the gate must reject (the images themselves are fine)
    pics = {k: _encode(_picture(200 + n), "PNG") for n, k in enumerate(["e", "w", "u", "l"])}
    for k, body in pics.items():
        BODIES[f"/cap-{k}.png"] = body
    rows += [
        (f"{base}/cap-e.png", b"", "caption_chars"),
        (f"{base}/cap-w.png", b"   \t ", "caption_chars"),
        (f"{base}/cap-u.png", b"caf\xe9 cr\xe8me", "caption_utf8"),
        (f"{base}/cap-l.png", b"x" * 10_000, "caption_chars"),
        (base + "/good/0.png", b"good picture 0 again", "duplicate_url"),
    ]
    lines = [b"url,caption"]
    for url, cap, _ in rows:
        lines.append(b'"' + url.encode() + b'","' + cap.replace(b'"', b'""') + b'"')
    (tmp_path / "list.csv").write_bytes(b"\n".join(lines) + b"\n")
    _write_params(tmp_path)

    t0 = time.monotonic()
    r = _kiln(
        ["ingest", "--url-list", "list.csv", "--out", "raw", "--allow-network", "127.0.0.1/32"],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert time.monotonic() - t0 < 120  # stalls and drips were cut off, not waited out

    rejects = pd.read_parquet(tmp_path / "raw" / "rejects.parquet").set_index("url")
    for url, _, why in rows:
        if why is not None and not why.startswith(("caption", "duplicate")):
            assert why in rejects.loc[url, "reason"], (url, rejects.loc[url, "reason"])
    assert "total deadline exceeded" in r.stderr  # the report lists reasons at the end

    params = config.load(tmp_path / "params.yaml")
    report = validate.run(params, tmp_path / "raw", tmp_path / "clean")
    gate = pd.read_parquet(tmp_path / "clean" / "rejects.parquet")
    by_url = gate.set_index("url")
    for url, _, why in rows:
        if why is not None and why.startswith(("caption", "duplicate")):
            assert why in by_url.loc[url, "failed_checks"], (url, by_url.loc[url].to_dict())
    # every ingest reject is carried into the one table, with its stage
    assert (gate.stage == "ingest").sum() == len(rejects)
    # nothing vanished: every row is either clean or in the rejects table
    assert report["train"] + report["val"] + len(gate) == len(rows)

    clean = {}
    for split in ("train", "val"):
        for rec in shards.read(shards.shard_paths(tmp_path / "clean" / split)):
            clean[rec.caption] = np.asarray(rec.image())
    for i in range(11):
        assert f"good picture {i}" in clean
    assert len(clean) == 11 + len(converted), (
        sorted(clean),
        gate[gate.stage == "validate"].to_dict("records"),
    )

    def px(name, y, x):
        return clean[f"converted {name}"][y, x].astype(int)

    assert np.abs(px("/cmyk.jpg", 16, 16) - [255, 0, 0]).max() < 40  # CMYK red stays red
    assert np.abs(px("/gray16.png", 16, 16) - 128).max() <= 2  # 16-bit grey scaled, not clipped
    assert px("/palette.png", 16, 4).min() > 240  # transparent -> white
    assert np.abs(px("/palette.png", 16, 28) - [20, 20, 230]).max() < 30
    assert np.abs(px("/anim.gif", 16, 16) - [20, 200, 20]).max() < 30  # first frame
    top, bottom = px("/exif.jpg", 4, 16), px("/exif.jpg", 28, 16)  # upright: red over blue
    assert top[0] > 150 and top[2] < 100 and bottom[2] > 150 and bottom[0] < 100


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("nocol.csv", b"link,caption\nhttp://x/a.png,a\n", "no column 'url'"),
        (
            "types.jsonl",
            b'{"url": "http://x/a.png", "caption": "a"}\n{"url": 12345, "caption": "b"}\n',
            "column 'url' must hold text",
        ),
        (
            "capnum.jsonl",
            b'{"url": "http://x/a.png", "caption": 7}\n',
            "column 'caption' must hold text",
        ),
        ("list.xlsx", b"x", "unsupported url list format"),
    ],
)
def test_bad_url_list_fails_before_any_download(server, tmp_path: Path, name, content, message):
    (tmp_path / name).write_bytes(content)
    before = Handler.hits
    r = _kiln(["ingest", "--url-list", name, "--out", "raw"], tmp_path, timeout=120)
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("kiln: error: ingest:") and message in line, r.stderr[-2000:]
    assert Handler.hits == before
    assert not (tmp_path / "raw" / "shards").exists()


# ---- sources that cannot work: one line naming the path, a ValueError (never retried) --
def _ingest_params(**ingest_cfg) -> config.Params:
    return config.resolve({"ingest": {"processes": 1, "threads": 4, "retries": 0, **ingest_cfg}})


@pytest.mark.parametrize(
    ("dataset", "make", "message"),
    [
        ("folder", lambda d: d / "nope", "image folder {p} does not exist"),
        ("folder", lambda d: (d / "f.txt", (d / "f.txt").write_text("x"))[0], "is not a folder"),
        ("folder", lambda d: (d / "e", (d / "e").mkdir())[0], "image folder {p} holds no images"),
        ("url-list", lambda d: d / "nope.csv", "url list {p} does not exist"),
        ("url-list", lambda d: d, "url list {p} is not a file"),
        ("url-list", lambda d: (d / "e.csv", (d / "e.csv").write_bytes(b""))[0], "is empty"),
        (
            "url-list",
            lambda d: (d / "h.csv", (d / "h.csv").write_text("url,caption\n"))[0],
            "no rows",
        ),
        ("shards", lambda d: d / "none-*.tar", "no shards match"),
        (
            "shards",
            lambda d: (d / "e.tar", (d / "e.tar").write_bytes(b""))[0],
            "not a tar shard (empty file)",
        ),
    ],
)
def test_unusable_sources_fail_in_one_line_before_any_work(tmp_path: Path, dataset, make, message):
    from training.intake import ingest, sources

    src = tmp_path / "src"
    src.mkdir()
    path = make(src)
    with pytest.raises(sources.SourceError) as err:
        ingest.run(
            _ingest_params(dataset=dataset, source=str(path)), tmp_path / "raw", tmp_path / "w"
        )
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert message.format(p=path) in msg and "\n" not in msg and not msg.startswith("ingest:"), msg
    assert not (tmp_path / "w").exists()  # no work folder is left behind
    assert not (tmp_path / "raw" / "shards").exists()


def test_missing_distributor_is_a_config_error(tmp_path: Path):
    from training.intake import ingest, sources

    with pytest.raises(sources.SourceError, match="ingest.distributor is 'ray' but ray is not"):
        ingest.run(_ingest_params(distributor="ray"), tmp_path / "raw", tmp_path / "w")


def test_every_row_refused_is_permanent_and_timeouts_are_not(tmp_path: Path, server):
    from training.intake import ingest, sources

    base, _ = server
    pd.DataFrame(
        {"url": [f"{base}/good/{i}.png" for i in range(3)], "caption": ["a"] * 3}
    ).to_parquet(tmp_path / "l.parquet")
    params = _ingest_params(dataset="url-list", source=str(tmp_path / "l.parquet"))
    with pytest.raises(sources.SourceError) as err:  # forgot --allow-network
        ingest.run(params, tmp_path / "raw", tmp_path / "w")
    msg = str(err.value)
    assert msg.startswith("no image could be downloaded: all 3 failed (3 refused: loopback address")
    assert "--allow-network" in msg and "{" not in msg
    report = {"count": 2, "failures_by_reason": {"timed out": 1, "HTTP Error 404": 1}}
    assert type(ingest.no_image_error(report, Path("r.parquet"))) is ConnectionError  # retried


def test_source_options_without_out_do_not_write_into_the_pipelines_data(tmp_path: Path):
    """Were: `kiln ingest --folder DIR` (or --allow-network alone) wrote data/raw outside
    DVC and the run lock; the next `kiln run` re-ingested params.yaml's source over it,
    and the allowance never reached the DVC stage."""
    (tmp_path / "pics").mkdir()
    for args in (["--folder", "pics"], ["--allow-network", "10.0.0.0/8"]):
        r = _kiln(["ingest", *args], tmp_path, timeout=120)
        assert r.returncode == 1
        assert (
            r.stderr.strip()
            .splitlines()[-1]
            .startswith(
                "kiln: error: ingest: source options run ingest outside DVC and need --out DIR"
            )
        ), r.stderr
        assert not (tmp_path / "data").exists()


def test_cli_names_the_missing_folder_in_one_line(tmp_path: Path):
    r = _kiln(["ingest", "--folder", "no-such-dir", "--out", "raw"], tmp_path, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "kiln: error: ingest: image folder no-such-dir does not exist"
    )
    assert not (tmp_path / "raw" / ".work").exists()


def test_the_total_deadline_holds_for_https(tls_server):
    """Was: the watchdog held the plain socket, which ``wrap_socket`` detaches, so its
    shutdown failed silently and a dripping https server kept a worker for as long as it
    dripped (http stopped at deadline_s)."""
    from training.intake import guard

    policy = guard.Policy(allow_networks=("127.0.0.1/32",), deadline_s=2.0)
    body, _ = guard.fetch_bytes(f"{tls_server}/good/0.png", 10, policy)  # the cert is trusted
    assert body == GOOD["/good/0.png"]
    outcome: list[object] = []

    def fetch() -> None:
        t0 = time.monotonic()
        try:
            guard.fetch_bytes(f"{tls_server}/drip", 10, policy)
            outcome.append("kept")
        except Exception as exc:  # noqa: BLE001 - the test reads the reason
            outcome.append(guard.reason(exc))
        outcome.append(time.monotonic() - t0)

    worker = threading.Thread(target=fetch, daemon=True)  # left behind if the guard fails
    worker.start()
    worker.join(policy.deadline_s + 1.5)
    assert not worker.is_alive(), "a dripping https server outlived deadline_s"
    assert outcome[0] == "total deadline exceeded", outcome
    assert policy.deadline_s - 0.1 <= outcome[1] <= policy.deadline_s + 1.0, outcome
