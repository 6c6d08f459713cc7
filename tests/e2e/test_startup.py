"""`dispatch serve` refuses to start as configured with one clear line and a non-zero exit, before
any worker is forked: a port taken, a database URL that does not parse, a database that does not
answer or has no connection left. A worker that fails at start-up twice stops the supervisor."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from dispatch import supervisor
from dispatch.settings import Settings, load_settings
from tests.serve import free_port, serve_ports


def ports() -> dict[str, str]:
    api, ops = serve_ports()
    return {"DISPATCH_PORT": str(api), "DISPATCH_METRICS_PORT": str(ops)}


def serve(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    return subprocess.run(
        [sys.executable, "-m", "dispatch", *args], capture_output=True, text=True,
        timeout=timeout, env={**base, **env},
    )


def one_clear_line(done: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "worker" not in done.stderr, done.stderr  # nothing was forked
    line = done.stderr.strip()
    assert "\n" not in line, line
    for part in expected:
        assert part in line, line


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another serve listens on (with SO_REUSEPORT, as serve --workers binds it)."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("0.0.0.0", 0))
        other.listen()
        yield int(other.getsockname()[1])


@pytest.mark.parametrize("workers", ["1", "4"])
def test_a_port_in_use_is_one_line_naming_the_port_and_the_setting(
    taken_port: int, db_url: str, workers: str
) -> None:
    done = serve("serve", "--workers", workers, DISPATCH_DATABASE_URL=db_url,
                 DISPATCH_PORT=str(taken_port), DISPATCH_METRICS_PORT=str(free_port()))
    one_clear_line(done, f"port {taken_port}", "already in use", "DISPATCH_PORT")
    done = serve("serve", "--workers", workers, DISPATCH_DATABASE_URL=db_url,
                 DISPATCH_PORT=str(free_port()), DISPATCH_METRICS_PORT=str(taken_port))
    one_clear_line(done, f"port {taken_port}", "DISPATCH_METRICS_PORT")


def test_a_malformed_database_url_names_the_setting() -> None:
    done = serve("serve", DISPATCH_DATABASE_URL="localhost:5432 dbname",
                 **ports())
    one_clear_line(done, "database.url (DISPATCH_DATABASE_URL) is malformed",
                   "postgresql://user:password@host:5432/dbname")


def test_an_unreachable_database_names_host_port_and_setting() -> None:
    dead = free_port()
    for args in (["serve"], ["migrate"]):
        done = serve(*args, DISPATCH_DATABASE_URL=f"postgresql://nobody@127.0.0.1:{dead}/x",
                     **ports())
        one_clear_line(done, f"cannot connect to the database at 127.0.0.1:{dead}",
                       "DISPATCH_DATABASE_URL", "Connection refused")


def test_a_full_database_is_told_from_a_missing_one(db_url: str, pg_server: str) -> None:
    role = f"full_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server, autocommit=True) as admin:
        # A role with no connection slot left meets the same refusal (SQLSTATE 53300) as a
        # server whose max_connections are all taken.
        admin.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 0")
        try:
            url = psycopg.conninfo.make_conninfo(db_url, user=role)
            done = serve("serve", DISPATCH_DATABASE_URL=url, **ports())
        finally:
            admin.execute(f"DROP ROLE {role}")
    one_clear_line(done, "is up but refuses more connections", "too many clients")


def test_a_worker_failing_at_start_up_twice_stops_the_supervisor(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Real worker processes that die at once, as one does when its port was taken after the
    # checks or its database went away: the supervisor gives up instead of restarting forever.
    def dying(i: int, env: dict[str, str], config: str | None,
              metrics_port: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])

    monkeypatch.setattr(supervisor, "_start", dying)
    settings: Settings = load_settings(None, {"DISPATCH_DATABASE_URL": db_url,
                                              "DISPATCH_SERVER_WORKERS": "2",
                                              "DISPATCH_SERVER_ADMIN_TOKEN": "t"})
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    began = time.monotonic()
    try:
        assert supervisor.run(settings, None) == 1
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert time.monotonic() - began < 30
