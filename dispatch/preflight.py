"""Checks `dispatch serve` makes before it starts anything (before a worker is forked), so that a
mistake ends in one line naming the setting and a non-zero exit, not in tracebacks or restarts:
a port already taken, a database URL that does not parse, a database that does not answer."""

from __future__ import annotations

import errno
import socket

import psycopg
from psycopg.conninfo import conninfo_to_dict

from dispatch.db import CONNECT_KWARGS
from dispatch.errors import ConfigError, DispatchError
from dispatch.settings import Settings

# A client that cannot get a connection slot: the server is up, it is full.
TOO_MANY_CLIENTS = "53300"


class StartupError(DispatchError):
    """serve cannot start as configured; the message says why and which setting to change."""


def check_ports(settings: Settings, workers: int) -> None:
    """The API port and every ops port (one per worker) are free on server.host."""
    s = settings.server
    wanted = [("server.port (DISPATCH_PORT)", s.port)]
    wanted += [("server.metrics_port (DISPATCH_METRICS_PORT)", s.metrics_port + i)
               for i in range(workers)]
    for setting, port in wanted:
        if port == 0:  # the system picks a free one
            continue
        family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As the server binds (SO_REUSEADDR), without SO_REUSEPORT: a listener of another
            # serve, even one sharing its port between workers, makes this bind fail.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((s.host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise StartupError(
                        f"port {port} on {s.host} is already in use (is another dispatch serve"
                        f" running?); stop it or choose another {setting}"
                    ) from None
                raise StartupError(f"cannot listen on {s.host}:{port} ({setting}): {exc}") from None


def check_database(url: str) -> None:
    """The URL parses and the database answers (a full server is told from a missing one)."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(
            f"database.url (DISPATCH_DATABASE_URL) is malformed: {_one_line(exc)}; expected e.g."
            " postgresql://user:password@host:5432/dbname"
        ) from None
    where = f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}"
    try:
        with psycopg.connect(url, connect_timeout=5, **CONNECT_KWARGS):  # type: ignore[arg-type]
            pass
    except psycopg.OperationalError as exc:
        # At connection time libpq reports the server's refusal as text, without its SQLSTATE.
        text = str(exc)
        if exc.sqlstate == TOO_MANY_CLIENTS or any(
            words in text for words in ("too many clients", "too many connections")
        ):
            raise StartupError(
                f"the database at {where} is up but refuses more connections (too many clients:"
                f" {_one_line(exc).rsplit('FATAL:', 1)[-1].strip()}); close some, or raise"
                " max_connections (or the role's connection limit)"
            ) from None
        raise StartupError(
            f"cannot connect to the database at {where} (database.url, DISPATCH_DATABASE_URL):"
            f" {_one_line(exc)}"
        ) from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
