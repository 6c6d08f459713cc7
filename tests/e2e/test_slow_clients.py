"""Slow clients cannot hold the API's connections: a request must arrive whole within
server.read_timeout_ms (this test sets 1 s; the default is 10 s), an idle keep-alive connection
is closed after server.keep_alive_ms."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from tests.serve import serving

READ_TIMEOUT_ENV = {"DISPATCH_SERVER_READ_TIMEOUT_MS": "1000"}


def connect(api: str) -> socket.socket:
    parts = urlsplit(api)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=15)
    return sock


def closed_by_server(sock: socket.socket, trickle: bytes, limit: float = 15.0) -> bool:
    """Send `trickle` a byte at a time, 0.2 s apart (then nothing), until the server closes the
    connection or `limit` seconds pass; True when the server closed it."""
    deadline = time.monotonic() + limit
    sock.settimeout(0.2)
    pending = list(trickle)
    while time.monotonic() < deadline:
        try:
            if pending:
                sock.send(bytes([pending.pop(0)]))
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return True
    return False


def test_a_client_that_trickles_its_headers_is_disconnected(db_url: str, tmp_path: Path) -> None:
    with serving(db_url, tmp_path, env=READ_TIMEOUT_ENV) as sp:
        request = b"GET /api/v1/tasks HTTP/1.1\r\nHost: x\r\nX-Agent-ID: slow\r\n" + b"X" * 200
        with connect(sp.api) as trickler, connect(sp.api) as silent:
            assert closed_by_server(trickler, request)
            assert closed_by_server(silent, b"")
        # Everyone else is served as usual.
        r = httpx.get(f"{sp.api}/api/v1/tasks", headers={"X-Agent-ID": "alice"})
        assert r.status_code == 200


def test_a_client_that_trickles_its_body_is_disconnected(db_url: str, tmp_path: Path) -> None:
    with serving(db_url, tmp_path, env=READ_TIMEOUT_ENV) as sp:
        head = (b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nX-Agent-ID: slow\r\n"
                b"Content-Type: application/json\r\nContent-Length: 400\r\n\r\n")
        with connect(sp.api) as trickler:
            trickler.sendall(head)
            assert closed_by_server(trickler, b'{"title": "' + b"x" * 300)
        r = httpx.get(f"{sp.api}/api/v1/tasks", headers={"X-Agent-ID": "alice"})
        assert r.status_code == 200 and r.json() == []  # the half-sent task was never created


def test_a_keep_alive_connection_serves_several_requests(db_url: str, tmp_path: Path) -> None:
    """The read deadline applies per request: a connection that keeps sending whole requests in
    time is not cut off, however long it lives."""
    with serving(db_url, tmp_path, env=READ_TIMEOUT_ENV) as sp, httpx.Client() as client:
        for _ in range(4):
            r = client.get(f"{sp.api}/api/v1/tasks", headers={"X-Agent-ID": "alice"})
            assert r.status_code == 200
            time.sleep(0.5)  # 2 s in all: past the read timeout, within keep-alive
        assert r.http_version == "HTTP/1.1"
