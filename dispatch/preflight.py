"""Checks `dispatch serve` makes before it starts anything (before a worker is forked), so that a
mistake ends in one line naming the setting and a non-zero exit, not in tracebacks or restarts:
a port already taken, a database URL that does not parse, a database that does not answer."""

from __future__ import annotations

import contextlib
import errno
import logging
import secrets
import socket
from typing import Any

import msgspec
import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from dispatch import db
from dispatch.db import LINK_KWARGS
from dispatch.errors import ConfigError, DispatchError
from dispatch.settings import DatabaseSettings, Settings

log = logging.getLogger(__name__)

# A client that cannot get a connection slot: the server is up, it is full.
TOO_MANY_CLIENTS = "53300"
# Each worker's connections outside its pool: /health's probe and a LISTEN (a lone serve's own;
# under serve --workers N the supervisor's one, counted once per worker as a margin).
FIXED_PER_WORKER = 2
# The smallest pool worth running a worker with.
MIN_POOL = 2


class StartupError(DispatchError):
    """serve cannot start as configured; the message says why and which setting to change."""


def check_ports(settings: Settings) -> None:
    """The API port and the ops port are free on server.host."""
    s = settings.server
    wanted = [("server.port (DISPATCH_PORT)", s.port),
              ("server.metrics_port (DISPATCH_METRICS_PORT)", s.metrics_port)]
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


def check_database(url: str, setting: str = "database.url") -> None:
    """The URL parses and the database answers (a full server is told from a missing one)."""
    env = "DISPATCH_" + setting.replace(".", "_").upper()
    try:
        conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(
            f"{setting} ({env}) is malformed: {_one_line(exc)}; expected e.g."
            " postgresql://user:password@host:5432/dbname"
        ) from None
    where = _where(url)
    try:
        with psycopg.connect(url, connect_timeout=5, **LINK_KWARGS):  # type: ignore[arg-type]
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
            f"cannot connect to the database at {where} ({setting}, {env}):"
            f" {_one_line(exc)}"
        ) from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    """How many workers, and each one's pool, fit in the connection budget."""

    workers: int
    pool_min: int
    pool_max: int
    budget: int


def connection_plan(url: str, settings: Settings, workers: int) -> Plan:
    """Share one connection budget (database.max_connections, else half of what the server has
    free now after a reserve for psql and other clients) among the workers: fewer workers when
    each could not get a pool of MIN_POOL, smaller pools when the configured ones do not fit.
    StartupError when not even one worker fits."""
    db = settings.database
    with psycopg.connect(url, connect_timeout=5, **LINK_KWARGS) as conn:  # type: ignore[arg-type]
        row = conn.execute(
            "SELECT current_setting('max_connections')::int,"
            " current_setting('superuser_reserved_connections')::int,"
            " (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int"
        ).fetchone()
    assert row is not None
    limit, superuser, used = row
    reserve = max(5, limit // 10)  # psql, monitoring, migrations of other replicas
    free = limit - superuser - (used - 1) - reserve  # this connection is closed by now
    need = workers * (FIXED_PER_WORKER + db.pool_max)
    if db.max_connections:
        budget = db.max_connections
        if budget > free:
            log.warning(
                "database.max_connections is %d, but the server at %s has %d connections free"
                " beside a reserve of %d", budget, _where(url), free, reserve,
            )
    else:
        budget = min(need, max(free, 0) // 2)
    fits = max(0, min(workers, budget // (FIXED_PER_WORKER + MIN_POOL)))
    if fits == 0:
        raise StartupError(
            f"too few database connections for dispatch serve: {budget} in its budget"
            f" ({'database.max_connections' if db.max_connections else 'half of the server'}"
            f"'s {free} free; max_connections {limit}, {used} in use, {reserve} kept for psql),"
            f" and a worker needs {FIXED_PER_WORKER + MIN_POOL}; raise the server's"
            " max_connections or set database.max_connections (DISPATCH_DATABASE_MAX_CONNECTIONS)"
        )
    pool_max = min(db.pool_max, budget // fits - FIXED_PER_WORKER)
    plan = Plan(workers=fits, pool_min=min(db.pool_min, pool_max), pool_max=pool_max,
                budget=budget)
    if fits < workers or pool_max < db.pool_max:
        log.warning(
            "the connection budget (%d) fits %d of %d workers with pools of %d (of %d)",
            budget, fits, workers, pool_max, db.pool_max,
        )
    return plan


def _where(url: str) -> str:
    params = conninfo_to_dict(url)
    return f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}"


def check_pool_mode(database: DatabaseSettings) -> None:
    """A transaction-mode pool has a session URL beside it for LISTEN and migrations."""
    if database.pool_mode == "transaction" and not database.listen_url:
        raise ConfigError(
            "database.pool_mode is transaction, so database.url cannot LISTEN or hold a"
            " migration's lock: set database.listen_url (DISPATCH_DATABASE_LISTEN_URL) to a"
            " direct or session-mode URL of the same database"
        )


def check_listen(database: DatabaseSettings, url: str) -> None:
    """A LISTEN on the session URL hears a NOTIFY sent through `url` (database.url, resolved).
    It does not when the session URL goes through a transaction-mode pooler (the server
    connection that ran the LISTEN went back to the pool, where its notifications are dropped)
    or to another server. Checked before anything runs on the session URL: a migration there
    would leave its settings on a pooled server connection."""
    listen = session_url(database, url)
    token = secrets.token_hex(8)
    with psycopg.connect(listen, connect_timeout=5, **LINK_KWARGS) as ear:  # type: ignore[arg-type]
        ear.execute(f"LISTEN {LISTEN_CHECK_CHANNEL}")
        with psycopg.connect(url, connect_timeout=5, **LINK_KWARGS) as mouth:  # type: ignore[arg-type]
            mouth.execute("SELECT pg_notify(%s, %s)", (LISTEN_CHECK_CHANNEL, token))
        heard = any(n.payload == token for n in ear.notifies(timeout=LISTEN_CHECK_SECONDS))
        ear.execute(f"UNLISTEN {LISTEN_CHECK_CHANNEL}")
    if heard:
        return
    setting = "database.listen_url" if database.listen_url else "database.url"
    advice = (
        "set database.listen_url (DISPATCH_DATABASE_LISTEN_URL) to a direct or session-mode URL"
        " of the same database"
    )
    if database.pool_mode != "transaction":
        advice += (", and database.pool_mode to transaction if database.url is a"
                   " transaction-mode pooler")
    raise StartupError(
        f"a LISTEN on {setting} did not hear a NOTIFY sent through database.url within"
        f" {LISTEN_CHECK_SECONDS:g} s: it goes through a transaction-mode pooler, or to another"
        f" server; {advice}"
    )


def session_url(database: DatabaseSettings, url: str) -> str:
    """The URL of LISTEN, migrations and the connection plan: database.listen_url, else `url`."""
    return database.listen_url or url


# How many pooled connections the settings check reads at once, each in a transaction of its
# own, so that a transaction-mode pooler serves them from as many server connections.
SETTINGS_SAMPLE = 4
LISTEN_CHECK_SECONDS = 5.0
LISTEN_CHECK_CHANNEL = "dispatch_listen_check"


async def check_sessions(pool: AsyncConnectionPool[Any], database: DatabaseSettings) -> None:
    """The pooled sessions have the settings they must have (behind a transaction-mode pooler,
    as the server's defaults), and, in session mode, each pooled connection is one server
    session; a StartupError names what to change.

    SETTINGS_SAMPLE pooled connections each read their settings and server process in a
    transaction, all held open at once (a transaction pooler serves them from as many server
    connections), then again one after the other in the reverse order: a connection whose
    transactions ran on two server processes, or a server process two connections shared, is
    behind a transaction pooler (PgBouncer hands out its most recently freed server first, so
    the sample finds it)."""
    wanted = db.session_settings(database)
    found: dict[str, str] = {}
    n = min(SETTINGS_SAMPLE, pool.max_size)
    async with contextlib.AsyncExitStack() as stack:
        conns = [await stack.enter_async_context(db.connection(pool)) for _ in range(n)]
        seen: list[set[int]] = [set() for _ in conns]

        async def read(i: int) -> None:
            row = await db.read_session(conns[i])
            found.update(db.session_drift(row, wanted))
            seen[i].add(int(row["pid"]))

        async with contextlib.AsyncExitStack() as held:
            for i, conn in enumerate(conns):
                await held.enter_async_context(conn.transaction())
                await read(i)
        for i in reversed(range(n)):
            async with conns[i].transaction():
                await read(i)
    moved = any(len(pids) > 1 for pids in seen)
    shared = len(set().union(*seen)) < sum(len(pids) for pids in seen)
    if database.pool_mode == "session" and (moved or shared):
        raise StartupError(
            "database.url behaves as a transaction-mode pooler (one pooled connection's"
            " transactions ran on different server processes, or two shared one): set"
            " database.pool_mode to transaction and database.listen_url"
            " (DISPATCH_DATABASE_LISTEN_URL) to a direct or session-mode URL"
        )
    if found:
        have = ", ".join(f"{k}={v}" for k, v in sorted(found.items()))
        if database.pool_mode == "transaction":
            fix = "; ".join(f"ALTER ROLE <role> IN DATABASE <db> SET {k} = '{wanted[k]}'"
                            for k in sorted(found))
            raise StartupError(
                f"database.pool_mode is transaction, so sessions through database.url keep no"
                f" setting of Dispatch's own, and the server's defaults are not what they must"
                f" be ({have}): run {fix} (then RECONNECT in PgBouncer's console), or set them"
                " in the pooler's connect_query"
            )
        raise StartupError(
            f"sessions through database.url lose the settings Dispatch makes ({have}): is it a"
            " transaction-mode pooler? then set database.pool_mode to transaction"
        )
