"""The fetch guard: what any download of a user-listed URL may contact, and for how long.

img2dataset downloads with plain ``urllib``: it will read ``http://127.0.0.1/...``, a
cloud metadata endpoint or ``file:///etc/hostname`` if a URL list says so, and its
``timeout`` is per socket operation, so a server that drips one byte a second holds a
worker forever. :func:`fetch_bytes` (used by ``intake.download`` inside img2dataset's
workers, and for remote shards)

- accepts only ``http``/``https``;
- refuses loopback, private, link-local (169.254.169.254 included), multicast, reserved
  and unspecified addresses unless a CIDR in ``allow_networks`` covers them — checked at
  connect time on the *resolved* address, so DNS tricks do not help, and again on every
  redirect hop (at most ``max_redirects``); IPv6 forms of an IPv4 address (mapped, 6to4,
  NAT64) are judged by the IPv4 address they reach;
- enforces a total deadline per download (a watchdog shuts the socket) and a byte cap.

Every refusal is a categorical message (no URL or address inside), recorded as
img2dataset's per-sample error, so failures aggregate by reason in the shard stats and
the rejects table.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

from training.config import Params
from training.intake.deadline import Fetch as _Fetch
from training.intake.deadline import Refused, active, active_lock, start_watchdog

ALLOWED_SCHEMES = ("http", "https")
USER_AGENT = "Mozilla/5.0 (compatible; kiln-ingest; +img2dataset)"


@dataclass(frozen=True)
class Policy:
    """What a worker may fetch. Picklable: it travels to img2dataset's spawned workers."""

    allow_networks: tuple[str, ...] = ()
    deadline_s: float = 30.0
    max_bytes: int = 32 * 1024 * 1024
    max_redirects: int = 5
    max_pixels: int = 40_000_000
    background: tuple[int, int, int] = (255, 255, 255)  # transparency composited on it
    networks: tuple = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        nets = tuple(ipaddress.ip_network(n, strict=False) for n in self.allow_networks)
        object.__setattr__(self, "networks", nets)


def parse_networks(cidrs: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Validate ``--allow-network`` values; raises ValueError naming the bad one."""
    out = []
    for c in cidrs:
        try:
            out.append(str(ipaddress.ip_network(c.strip(), strict=False)))
        except ValueError:
            raise ValueError(
                f"--allow-network {c!r} is not a CIDR range (e.g. 10.0.0.0/8)"
            ) from None  # noqa: E501
    return tuple(out)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def embedded_ipv4(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64), else ``ip``."""
    if ip.version == 4:
        return ip
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip.sixtofour:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, policy: Policy) -> str | None:
    """Why ``ip`` may not be contacted under ``policy``, or None if it may.

    IPv6 forms that carry an IPv4 address to be reached are judged by that address:
    IPv4-mapped (``::ffff:a.b.c.d``), 6to4 (``2002:AABB:CCDD::``, which a host with a 6to4
    relay sends towards the embedded address; Python calls it global whatever it embeds)
    and NAT64's well-known prefix (``64:ff9b::a.b.c.d``, which an IPv6-only network's
    gateway forwards to a.b.c.d; Python files it under reserved, which refused public
    images on such networks)."""
    ip = embedded_ipv4(ip)
    if any(ip in net for net in policy.networks if net.version == ip.version):
        return None
    for attr, what in (
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_private", "private"),
        ("is_multicast", "multicast"),
        ("is_reserved", "reserved"),
        ("is_unspecified", "unspecified"),
    ):
        if getattr(ip, attr):
            return f"refused: {what} address (open it with --allow-network)"
    if not ip.is_global:
        return "refused: non-global address (open it with --allow-network)"
    return None


# ---- guarded connections: the address check happens where the socket is opened ---------
_DEFAULT_TIMEOUT = socket._GLOBAL_DEFAULT_TIMEOUT  # type: ignore[attr-defined]
_local = threading.local()  # the fetch under way in this thread, and its policy


def _guarded_create_connection(address, timeout=_DEFAULT_TIMEOUT, source_address=None):
    fetch: _Fetch = _local.fetch
    policy: Policy = _local.policy
    host, port = address
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise Refused("DNS lookup failed") from None
    reason, last_err = None, None
    for family, socktype, proto, _, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0].split("%")[0])
        reason = refusal(ip, policy)
        if reason:
            continue
        sock = socket.socket(family, socktype, proto)
        try:
            fetch.add(sock)
            remaining = max(0.01, fetch.expires - time.monotonic())
            to = remaining if timeout is _DEFAULT_TIMEOUT else min(timeout, remaining)
            sock.settimeout(to)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            last_err = exc
            sock.close()
    if last_err is not None:
        raise last_err
    raise Refused(reason or "refused: no usable address")


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._create_connection = _guarded_create_connection


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._create_connection = _guarded_create_connection


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_HTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_HTTPSConnection, req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Each hop's scheme is checked here (urllib itself would follow ftp:); each hop's
    address is checked by the guarded connection it opens. urllib counts hops only from
    the second on (the first request carries no redirect record), so ``max_redirects: 0``
    would follow one: refused here."""

    def http_error_302(self, req, fp, code, msg, headers):
        if self.max_redirections == 0:
            raise Refused("refused: redirect (ingest.max_redirects is 0)")
        target = headers.get("location") or headers.get("uri") or ""
        if urlsplit(urljoin(req.full_url, target)).scheme.lower() not in ALLOWED_SCHEMES:
            raise Refused("refused: redirect to a non-http(s) scheme")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


@functools.lru_cache(maxsize=8)
def _opener(policy: Policy) -> urllib.request.OpenerDirector:
    """An opener with only guarded http/https handlers: no proxies from the environment,
    no file:, ftp: or data: handlers at all. Built once per policy (handlers keep no
    per-request state; the guard's state is thread-local), not once per image."""
    redirect = _RedirectHandler()
    redirect.max_redirections = policy.max_redirects
    opener = urllib.request.OpenerDirector()
    for h in (
        urllib.request.ProxyHandler({}),
        urllib.request.UnknownHandler(),
        _HTTPHandler(),
        _HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        redirect,
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(h)
    return opener


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PATH_SAFE = "/%!$&'()*+,;=:@~"  # RFC 3986 pchar and "/": kept, "%" so as not to re-quote


def wire_url(url: str) -> str:
    """``url`` as it goes on the wire: spaces and non-ASCII characters of the path and
    query percent-encoded (UTF-8), a non-ASCII host name in IDNA, as browsers and curl
    send them (http.client refused the first with ``InvalidURL`` and could not encode
    the second: such pictures were lost). What the user wrote stays the row's URL and
    split key; a control character (a NUL, a tab) is refused, not encoded."""
    if _CONTROL.search(url):
        raise Refused("malformed URL (control character)")
    parts = urlsplit(url)
    netloc = parts.netloc
    if not netloc.isascii():
        try:
            host = parts.hostname.encode("idna").decode("ascii")
        except UnicodeError:
            raise Refused("malformed URL (host name)") from None
        netloc = host + (f":{parts.port}" if parts.port else "")
    path = quote(parts.path, safe=_PATH_SAFE)
    query = quote(parts.query, safe=_PATH_SAFE + "?")
    return urlunsplit((parts.scheme, netloc, path, query, ""))


def fetch_bytes(
    url: str, timeout: float, policy: Policy, headers: dict | None = None
) -> tuple[bytes, object]:
    """Download ``url`` under ``policy``; returns (body, response headers).

    Raises :class:`Refused` with a categorical reason, or urllib's own errors."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = parts.hostname
    except ValueError:
        raise Refused("malformed URL") from None
    if scheme not in ALLOWED_SCHEMES:
        raise Refused(f"refused: scheme {scheme or 'missing'!r} (only http/https)")
    if not host:
        raise Refused("malformed URL (no host)")
    try:
        url = wire_url(url)
    except ValueError:  # a bad port
        raise Refused("malformed URL") from None
    start_watchdog()
    fetch = _Fetch(policy.deadline_s)
    _local.fetch, _local.policy = fetch, policy
    with active_lock:
        active.add(fetch)
    try:
        req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})
        try:
            with _opener(policy).open(req, timeout=timeout) as r:
                length = r.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > policy.max_bytes:
                    raise Refused("larger than max_bytes")
                chunks, total = [], 0
                while True:
                    chunk = r.read(65536)
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > policy.max_bytes:
                        raise Refused("larger than max_bytes")
                    chunks.append(chunk)
                body, resp_headers = b"".join(chunks), r.headers
                expected = int(length) if length and length.isdigit() else None
        except urllib.error.HTTPError as exc:
            if exc.code in (301, 302, 303, 307, 308):
                raise Refused("too many redirects") from None
            raise
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, Refused):
                raise exc.reason from None
            if fetch.expired:
                raise Refused("total deadline exceeded") from None
            raise
        except (OSError, http.client.HTTPException):
            if fetch.expired:
                raise Refused("total deadline exceeded") from None
            raise
        if fetch.expired:  # the watchdog cut the body short: never keep a partial image
            raise Refused("total deadline exceeded")
        if expected is not None and len(body) < expected:
            # http.client ends a body the server closed early without a word: the part
            # was kept (half an image "corrupt", half a shard's samples silently gone)
            raise Refused("incomplete body")
        return body, resp_headers
    finally:
        with active_lock:
            active.discard(fetch)
        fetch.close()
        _local.fetch = None


def reason(exc: Exception) -> str:
    """A categorical one-line reason for a failed download (no URL inside)."""
    if isinstance(exc, Refused):
        return str(exc)
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP Error {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, Exception) else exc
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, http.client.IncompleteRead):
        return "incomplete body"
    if isinstance(exc, ConnectionError):
        return "connection error"
    return f"{type(exc).__name__}"


# Reasons (as ``reason`` and the guard word them) that a later attempt may not repeat:
# the network or the server, not the URL or the bytes. Everything else (refusals,
# malformed URLs, HTTP 4xx, not an image, too large) fails the same way every time.
_TRANSIENT = (
    "timed out",
    "total deadline exceeded",
    "connection refused",
    "connection error",
    "incomplete body",
    "DNS lookup failed",
    "HTTP Error 408",
    "HTTP Error 429",
    "HTTP Error 5",
)


def is_transient(why: str) -> bool:
    """Could retrying the download help? (``why`` is a recorded failure reason.)"""
    return why.startswith(_TRANSIENT)


def policy_for(params: Params, extra_networks: tuple[str, ...] = ()) -> Policy:
    """The guard's policy from ``params.ingest`` (plus CIDRs the caller allows, such as
    loopback for sources Kiln serves itself)."""
    c = params.ingest
    return Policy(
        allow_networks=parse_networks((*c.allow_networks, *extra_networks)),
        deadline_s=c.deadline_s,
        max_bytes=c.max_bytes,
        max_redirects=c.max_redirects,
        max_pixels=c.max_pixels,
        background=c.background_rgb,
    )
