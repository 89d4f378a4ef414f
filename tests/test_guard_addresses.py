"""The fetch guard on IPv6 forms that carry an IPv4 address, and on ``max_redirects: 0``."""

from __future__ import annotations

import http.server
import ipaddress
import threading

import pytest

from training.intake import guard


@pytest.mark.parametrize(
    "addr, what",
    [
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1: Python calls it global
        ("2002:a00:1::1", "private"),  # 6to4 of 10.0.0.1
        ("2002:a9fe:a9fe::", "link-local"),  # 6to4 of the cloud metadata address
        ("64:ff9b::7f00:1", "loopback"),  # NAT64 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "private"),  # Teredo
    ],
)
def test_ipv6_forms_of_a_refused_ipv4_address_are_refused(addr: str, what: str):
    reason = guard.refusal(ipaddress.ip_address(addr), guard.Policy())
    assert reason is not None and what in reason, (addr, reason)


def test_nat64_and_6to4_of_a_public_address_are_fetched_as_that_address():
    """An IPv6-only network reaches public IPv4 hosts through NAT64's 64:ff9b::/96; the
    guard refused every one of them as 'reserved'."""
    public = guard.Policy()
    for addr in ("64:ff9b::5db8:d822", "2002:5db8:d822::"):  # 93.184.216.34
        assert guard.refusal(ipaddress.ip_address(addr), public) is None, addr
    opened = guard.Policy(allow_networks=guard.parse_networks(["127.0.0.0/8"]))
    assert guard.refusal(ipaddress.ip_address("2002:7f00:1::"), opened) is None


class _Redirects(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/hop":
            self.send_response(302)
            self.send_header("Location", "/image")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"image")


@pytest.fixture(scope="module")
def redirecting():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirects)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_max_redirects_zero_follows_none(redirecting: str):
    """Was: urllib counts hops from the second one on, so 0 followed one redirect."""
    loop = ("127.0.0.1/32",)
    none = guard.Policy(allow_networks=loop, max_redirects=0)
    with pytest.raises(guard.Refused, match="max_redirects is 0"):
        guard.fetch_bytes(f"{redirecting}/hop", 10, none)
    body, _ = guard.fetch_bytes(f"{redirecting}/image", 10, none)  # no redirect: fetched
    assert body == b"image"
    one = guard.Policy(allow_networks=loop, max_redirects=1)
    body, _ = guard.fetch_bytes(f"{redirecting}/hop", 10, one)
    assert body == b"image"
