"""A real PgBouncer (the system's, e.g. Debian's `pgbouncer` package) in front of a test database:
one process per test, on a free loopback port, in session or transaction mode. PgBouncer refuses
to run as root, so as root it runs as the `postgres` user."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.serve import free_port


class PgBouncerMissing(RuntimeError):
    """No pgbouncer binary on this machine."""


def binary() -> str:
    found = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if Path(p).exists()), None
    )
    if found is None:
        raise PgBouncerMissing("pgbouncer is not installed (apt-get install pgbouncer)")
    return found


def _run_as(host: str) -> str | None:
    """The user PgBouncer runs as: None (this one) unless root; as root, the owner of the
    server's socket directory (it alone may reach the socket) or else `postgres`."""
    if os.geteuid() != 0:
        return None
    if host.startswith("/") and Path(host).owner() != "root":
        return Path(host).owner()
    return "postgres"


@contextlib.contextmanager
def pgbouncer(database_url: str, mode: str, *, pool_size: int = 20) -> Iterator[str]:
    """Run PgBouncer in `mode` ("session" or "transaction") in front of database_url's server;
    yield the URL of the same database through it."""
    exe = binary()
    params = conninfo_to_dict(database_url)
    host = str(params.get("host") or "127.0.0.1")
    user = str(params.get("user") or "postgres")
    server = f"host={host} port={params.get('port') or 5432} user={user}"
    if params.get("password"):
        server += f" password={params['password']}"
    root = Path(tempfile.mkdtemp(prefix="dispatch-pgbouncer-"))
    port = free_port()
    ini = root / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"* = {server}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = any\n"
        f"pool_mode = {mode}\n"
        "max_client_conn = 1000\n"
        f"default_pool_size = {pool_size}\n"
        f"logfile = {root / 'pgbouncer.log'}\n"
        f"pidfile = {root / 'pgbouncer.pid'}\n"
    )
    runner = _run_as(host)
    if runner is not None:
        shutil.chown(root, runner)
        shutil.chown(ini, runner)
    command = [exe, str(ini)] if runner is None else ["runuser", "-u", runner, "--", exe, str(ini)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = make_conninfo(
        host="127.0.0.1", port=port, user=user,
        dbname=str(params["dbname"]),
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with psycopg.connect(url, connect_timeout=2, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "pgbouncer did not start:\n" + log_text(root)
                    ) from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(root, ignore_errors=True)


def log_text(root: Path) -> str:
    log = root / "pgbouncer.log"
    return log.read_text(errors="replace") if log.exists() else "(no log)"
