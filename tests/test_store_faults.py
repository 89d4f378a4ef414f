"""The shard cache and the object store when things go wrong (found in review): a
download cut by a kill, two processes on one cache folder, a store that refuses or does
not answer, a cached copy damaged between runs. Against moto's S3 server as its own
process on loopback, through ``Faults``, a loopback proxy that breaks the requests it
is told to: boto3 is the real client on real HTTP throughout."""

from __future__ import annotations

import contextlib
import http.client
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from training.cli.base import transient
from training.engine import loaders
from training.errors import UserError
from training.intake import store as S
from training.intake.index import file_sha256
from training.intake.store_errors import StoreRefused, StoreUnreachable

from .conftest import free_port, wait_http
from .loaderkit import image_split

BUCKET = "kiln-faults"
REPO = Path(__file__).resolve().parents[1]


class Faults:
    """A loopback HTTP proxy in front of ``upstream`` that breaks the requests whose
    path holds ``rule["match"]`` (and whose method is in ``rule["methods"]``, GET and
    HEAD unless said): answers ``rule["status"]`` with an S3 error ``rule["code"]``, or
    sends the body in 32 KiB pieces ``rule["slow"]`` seconds apart, or cuts it after
    ``rule["cut"]`` bytes. An empty rule passes everything through."""

    def __init__(self, upstream: str):
        self.rule: dict = {}
        self.hits = 0
        up = urllib.parse.urlsplit(upstream)
        faults = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                rule = faults.rule
                methods = rule.get("methods", ("GET", "HEAD"))
                hit = bool(rule) and rule.get("match", "") in self.path and self.command in methods
                faults.hits += hit
                if hit and "status" in rule:
                    error = f"<Error><Code>{rule['code']}</Code><Message>injected</Message></Error>"
                    payload = b"" if self.command == "HEAD" else error.encode()
                    self.send_response(rule["status"])
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "server", "date"):
                        self.send_header(k, v)
                self.end_headers()
                if self.command == "HEAD":
                    return
                with contextlib.suppress(OSError):  # the client hung up (or was killed)
                    if hit and "cut" in rule:
                        self.wfile.write(data[: rule["cut"]])
                        self.close_connection = True
                    elif hit and "slow" in rule:
                        for i in range(0, len(data), 32768):
                            self.wfile.write(data[i : i + 32768])
                            self.wfile.flush()
                            time.sleep(rule["slow"])
                    else:
                        self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def moto(tmp_path_factory) -> str:
    """moto's S3 server on a loopback port, with the split ``split/`` uploaded: 3
    shards of 20 noise pictures of 128 px (~1 MB each, over s3transfer's 256 KiB write
    chunk, so a slowed download is seen half-written)."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    exe = Path(sys.executable).with_name("moto_server")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url, proc, log, timeout=60)
        with pytest.MonkeyPatch.context() as mp:
            _credentials(mp, url)
            client = S.s3_client()
            client.create_bucket(Bucket=BUCKET)
            split = image_split(tmp_path_factory.mktemp("split"), n=60, per_shard=20, size=128)
            for p in sorted(split.iterdir()):
                client.upload_file(str(p), BUCKET, f"split/{p.name}")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _credentials(mp: pytest.MonkeyPatch, endpoint: str) -> None:
    mp.setenv("AWS_ENDPOINT_URL", endpoint)
    mp.setenv("AWS_ACCESS_KEY_ID", "test")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "test")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture
def faults(moto, monkeypatch):
    """The proxy in front of moto, and boto3 pointed at it."""
    proxy = Faults(moto)
    _credentials(monkeypatch, proxy.url)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    yield proxy
    proxy.close()


SOURCE = f"s3://{BUCKET}/split"


def _files(root: Path) -> list[str]:
    """The cache's files (its directories' lock files aside)."""
    return sorted(p.name for p in root.rglob("*") if p.is_file() and p.name != ".lock")


# ---- 1. a download cut by a kill ---------------------------------------------------


CHILD = """
import sys
from pathlib import Path
from training.intake.store import Store
store = Store(Path(sys.argv[1]), 10**9)
store.path(store.index(sys.argv[2]), 0)
"""


def test_a_download_cut_by_a_kill_leaves_nothing_the_next_run_does_not_clear(faults, tmp_path):
    """Found in review: boto3's ``download_file`` wrote to ``<name>.<8 random chars>``,
    which the startup clean-up (``*/.*.tmp``) never matched: every killed download left
    its partial file on disk for good, outside the cache's budget."""
    cache = tmp_path / "cache"
    faults.rule = {"match": ".tar", "methods": ("GET",), "slow": 0.1}  # ~3 s a shard
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(cache), SOURCE], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not [p for p in cache.rglob(".*.tmp*") if p.stat().st_size > 0]:
            assert child.poll() is None and time.monotonic() < deadline, "no download seen"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    left = _files(cache)
    assert len(left) == 1 and left[0].startswith(".") and left[0].endswith(".tmp"), left
    faults.rule = {}
    S.Store(cache, 10**9)  # the next run
    assert _files(cache) == []
    # what a killed run of an earlier Kiln left: boto3's own partial-file name
    legacy = next(cache.iterdir()) / "ab" / f".{'ab' * 32}.tar.123.456.tmp.a1B2c3D4"
    legacy.parent.mkdir(parents=True, exist_ok=True)
    legacy.write_bytes(b"half")
    S.Store(cache, 10**9)
    assert _files(cache) == []


# ---- 2. two processes on one cache folder --------------------------------------------

HOLDER = """
import sys
from pathlib import Path
from training.intake.store import Store
store = Store(Path(sys.argv[1]), 10**9)
store.path(store.index(sys.argv[2]), 0)
print(store.dir, flush=True)
sys.stdin.read()  # holds its directory until the test lets it end
"""


def test_two_processes_on_one_cache_folder_keep_to_their_own_directories(faults, tmp_path):
    """Found in review: two stages run by hand side by side (one host, one LOCAL_RANK)
    shared ``<host>-0``, evicted each other's files and crashed with FileNotFoundError.
    The second now takes ``<host>-0-1``; the next run takes ``<host>-0`` again, files and
    all."""
    cache = tmp_path / "cache"
    first = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(cache), SOURCE],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        held = Path(first.stdout.readline().strip())
        assert held.name == f"{socket.gethostname()}-0"
        second = S.Store(cache, 10**9)
        assert second.dir == cache / f"{held.name}-1"
        idx = second.index(SOURCE)
        mine = second.path(idx, 1)
        assert mine.parent.parent == second.dir and len(_files(held)) == 1
    finally:
        first.communicate("", timeout=60)
    second.close()
    third, fetched = S.Store(cache, 10**9), []  # the next run: the first's files
    assert third.dir == held and third.path(idx, 0, fetched.append).parent.parent == held
    assert fetched == []
    third.close()


def test_a_listed_file_that_is_gone_is_fetched_again(faults, tmp_path):
    """The store's list is not the disk: a file deleted under it (by hand, or by another
    process before each had its own directory) is fetched again, not handed out."""
    store = S.Store(tmp_path / "cache", 10**9)
    idx = store.index(SOURCE)
    store.path(idx, 0).unlink()
    fetched: list[int] = []
    again = store.path(idx, 0, fetched.append)
    assert again.is_file() and fetched == [idx.shards[0].filesize]
    store.close()


# ---- 3. a store that refuses, or does not answer -------------------------------------


def _names_once(exc: BaseException, url: str) -> str:
    """``exc``'s message: one line that names ``url`` once."""
    msg = str(exc)
    assert "\n" not in msg and msg.count(url) == 1, msg
    return msg


def _take_first(store: S.Store):
    split = loaders.Split(SOURCE, lambda s: s, lambda xs: {}, store=store)
    try:
        split.take([0])
    finally:
        split.close()
    return split


def test_a_refused_download_is_one_line_saying_to_check_credentials_and_endpoint(faults, tmp_path):
    """Found in review: boto3's own "An error occurred (403) when calling the
    HeadObject operation: Forbidden", naming neither the object nor the fix, and no
    UserError (so not one clean line)."""
    store = S.Store(tmp_path / "cache", 10**9)
    faults.rule = {"match": ".tar", "status": 403, "code": "AccessDenied"}
    with pytest.raises(UserError) as info:
        _take_first(store)
    msg = _names_once(info.value, f"{SOURCE}/train-00000.tar")
    assert "refused" in msg and "AWS_ACCESS_KEY_ID" in msg and "AWS_ENDPOINT_URL" in msg
    assert not transient(info.value) and faults.hits
    store.close()


def test_a_store_that_does_not_answer_is_a_retryable_error_naming_the_object_once(
    faults, tmp_path, monkeypatch
):
    """Found in review: 500s past boto3's retries surfaced as a raw ClientError that the
    flow recorded ``retry: false``. Now a ConnectionError (the flow retries the stage),
    and the loader does not wrap it again: the object is named once."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    store = S.Store(tmp_path / "cache", 10**9)
    faults.rule = {"match": ".tar", "status": 500, "code": "InternalError"}
    with pytest.raises(ConnectionError) as info:
        _take_first(store)
    assert isinstance(info.value, StoreUnreachable) and transient(info.value)
    msg = _names_once(info.value, f"{SOURCE}/train-00000.tar")
    assert "did not answer after boto3's retries" in msg
    store.close()


@pytest.mark.parametrize(
    ("rule", "where", "error"),
    [
        ({"match": "list-type", "status": 403, "code": "AccessDenied"}, "/", StoreRefused),
        ({"match": "list-type", "status": 503, "code": "SlowDown"}, "/", StoreUnreachable),
        ({"match": "index.json", "status": 500, "code": "InternalError"}, "/index.json", None),
        ({"match": ".tar", "methods": ("GET",), "cut": 1000}, "/train-00000.tar", None),
    ],
    ids=["list-403", "list-503", "index-500", "shard-cut-on-every-try"],
)
def test_each_store_request_fails_as_one_line_naming_its_object(
    faults, tmp_path, monkeypatch, rule, where, error
):
    """The split's index, its listing and a shard's download (cut short on each of
    s3transfer's tries: RetriesExceededError) each say which object failed."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    store = S.Store(tmp_path / "cache", 10**9)
    idx = store.index(SOURCE) if where.endswith(".tar") else None
    faults.rule = rule
    with pytest.raises(error or StoreUnreachable) as info:
        store.path(idx, 0) if idx else store.index(SOURCE)
    _names_once(info.value, SOURCE + where)
    assert transient(info.value) == (error is not StoreRefused)
    assert _files(tmp_path / "cache") == []  # no partial file
    store.close()


def test_no_credentials_or_no_server_say_what_to_check(faults, tmp_path, monkeypatch):
    """NoCredentialsError and EndpointConnectionError, boto3's words, now name the index
    they were reading and the variables to check."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import boto3

    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it keeps the keys it found
    with pytest.raises(StoreRefused) as info:
        S.Store(tmp_path / "a", 10**9).index(SOURCE)
    msg = _names_once(info.value, f"{SOURCE}/index.json")
    assert "no credentials" in msg and "AWS_ACCESS_KEY_ID" in msg and faults.url in msg

    _credentials(monkeypatch, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    with pytest.raises(StoreUnreachable) as info:
        S.Store(tmp_path / "b", 10**9).index(SOURCE)
    msg = _names_once(info.value, f"{SOURCE}/index.json")
    assert "EndpointConnectionError" in msg and transient(info.value)


# ---- 4. a cached copy damaged between runs -------------------------------------------


def test_an_earlier_runs_damaged_copy_is_checked_and_fetched_again(faults, tmp_path, capsys):
    """Found in review: a cached copy cut short or with a flipped bit (a crash before
    the disk's writeback, a failing disk) was adopted unread, and the loader marked the
    good shard bad for the whole run. An adopted file is checked (size, sha256) the
    first time it is handed out; the intact one is not fetched again."""
    cache = tmp_path / "cache"
    first = S.Store(cache, 10**9)
    idx = first.index(SOURCE)
    flipped, cut, intact = (first.path(idx, i) for i in range(3))
    first.close()
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:40_000])

    store = S.Store(cache, 10**9)  # the next run
    split = loaders.Split(SOURCE, lambda s: s, lambda xs: {"n": len(xs)}, store=store)
    try:
        assert split.take(list(range(60)))["n"] == 60
    finally:
        split.close()
    assert split.bad_shards == {} and split.skipped_samples == 0
    assert split.downloaded == idx.shards[0].filesize + idx.shards[1].filesize
    for i, path in enumerate((flipped, cut, intact)):
        assert file_sha256(path) == idx.shards[i].sha256
    assert capsys.readouterr().err.count("in the index; fetching it again") == 2
    store.close()
