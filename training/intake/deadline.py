"""The fetch guard's total deadline: one watchdog thread per process shuts the sockets
of downloads past their deadline. urllib's ``timeout`` is per socket operation, so a
server that drips one byte a second would otherwise hold a worker forever."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class Refused(Exception):
    """A download Kiln will not make or keep; the message is the recorded reason."""


class Fetch:
    """One download's deadline and the connections it opened.

    It keeps a *duplicate* of each socket: ``shutdown`` acts on the connection, not the
    file descriptor, so shutting the duplicate stops any read on the original. The
    original itself would not do: for https, ``wrap_socket`` detaches it (its fd
    becomes -1, ``shutdown`` fails) and the TLS socket takes over the connection, so a
    dripping https server held a worker past ``deadline_s`` for as long as it liked."""

    def __init__(self, deadline_s: float):
        self.expires = time.monotonic() + deadline_s
        self.expired = False
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()

    def add(self, sock: socket.socket) -> None:
        with self.lock:
            if self.expired:
                sock.close()
                raise Refused("total deadline exceeded")
            self.socks.append(sock.dup())

    def expire(self) -> None:
        with self.lock:
            self.expired = True
            for s in self.socks:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the duplicates (the connections close with their last descriptor)."""
        with self.lock:
            for s in self.socks:
                s.close()
            self.socks.clear()


active: set[Fetch] = set()
active_lock = threading.Lock()
_watchdog: threading.Thread | None = None


def _watch() -> None:
    while True:
        time.sleep(0.1)
        now = time.monotonic()
        with active_lock:
            due = [f for f in active if not f.expired and f.expires <= now]
        for f in due:
            f.expire()


def start_watchdog() -> None:
    """Start this process's watchdog (again, in a forked or spawned worker)."""
    global _watchdog
    with active_lock:
        if _watchdog is None or not _watchdog.is_alive():
            _watchdog = threading.Thread(target=_watch, name="kiln-fetch-deadline", daemon=True)
            _watchdog.start()
