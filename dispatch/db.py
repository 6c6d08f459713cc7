"""Connections: the async pool, the embedded Postgres, and psycopg errors -> Dispatch errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import time
import warnings
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import psycopg
from psycopg import errors as pg_errors
from psycopg.abc import AdaptContext, Buffer
from psycopg.adapt import Loader
from psycopg.rows import dict_row
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from dispatch.errors import (
    Conflict,
    DispatchError,
    Forbidden,
    InvalidInput,
    NotFound,
    Unavailable,
)
from dispatch.settings import DatabaseSettings

log = logging.getLogger(__name__)

# The libpq parameters of every connection Dispatch opens. Over TCP, a server that has gone
# without a goodbye (a partition, a host that died: the connection is half-open) is given up on
# after about 30 s: keepalive probes find it while the connection waits for an answer or for a
# NOTIFY, and tcp_user_timeout while a request goes unacknowledged. The kernel's own defaults wait
# two hours and 15 minutes, and meanwhile the request (or the LISTEN) hangs. libpq ignores these
# for Unix sockets. No `options`: PgBouncer refuses a connection that sends it ("unsupported
# startup parameter"), so session settings are made once connected (`set_session`), or, behind a
# transaction-mode pooler, are the server's defaults (`session_drift`).
LINK_KWARGS: dict[str, object] = {
    "autocommit": True,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30000,
}
# A direct connection of a tool or a test that talks to Postgres itself: UTC from the start.
CONNECT_KWARGS: dict[str, object] = {**LINK_KWARGS, "options": "-c TimeZone=UTC"}

# A pool slot whose server went away retries its connection with a doubling delay; giving up
# after this long (a waiting request then starts a fresh slot) keeps the delay short, so that the
# pool is back within a couple of seconds of the database, however long the outage was.
RECONNECT_SECONDS = 5.0
# Retry-After of an answer to a database out of reach (busy answers say 1 s).
UNREACHABLE_RETRY_AFTER = 2

# Timeouts of our own session settings, and conflicts between transactions: nothing was done and a
# retry may well succeed (SQLSTATE 55P03, 57014, 40001, 40P01).
_BUSY: tuple[tuple[type[psycopg.Error], str, str], ...] = (
    (
        pg_errors.LockNotAvailable,
        "lock_timeout",
        "database busy: a row this request needs stayed locked by another session past "
        "database.lock_timeout_ms; nothing was changed, retry",
    ),
    (
        pg_errors.QueryCanceled,
        "statement_timeout",
        "database busy: the statement ran past database.statement_timeout_ms (or was cancelled); "
        "nothing was changed, retry",
    ),
    (
        pg_errors.SerializationFailure,
        "conflict",
        "database busy: conflict with a concurrent transaction; nothing was changed, retry",
    ),
    (
        pg_errors.DeadlockDetected,
        "conflict",
        "database busy: conflict with a concurrent transaction; nothing was changed, retry",
    ),
)

# SQLSTATEs raised by the SQL functions (see dispatch/sql/schema/02_guards.sql).
_CODES: dict[str, type[DispatchError]] = {
    "UD400": InvalidInput,
    "UD403": Forbidden,
    "UD404": NotFound,
    "UD409": Conflict,
}

# Unique / foreign-key constraints by name -> the field to blame.
_CONSTRAINT_FIELDS = {
    "tasks_parent_task_id_fkey": "parent_task_id",
    "agents_agent_id_format": "agent_id",
    "agents_max_concurrent_range": "max_concurrent",
    "tasks_idempotency_key_length": "idempotency_key",
    "tasks_title_length": "title",
    "tasks_description_length": "description",
    "tasks_priority_range": "priority",
    "tasks_max_retries_range": "max_retries",
    "tasks_timeout_positive": "timeout_seconds",
    "tasks_heartbeat_positive": "heartbeat_seconds",
    "tasks_metadata_object": "metadata",
    "tasks_progress_object": "progress",
    "schedules_name_check": "name",
    "schedules_cron_check": "cron",
    "schedules_timezone_check": "timezone",
    "schedules_template_check": "template",
    "schedules_overlap_check": "overlap",
    "schedules_catch_up_check": "catch_up",
    "schedules_catch_up_limit_check": "catch_up_limit",
}


def translate(exc: psycopg.Error) -> DispatchError:
    """Map a database error to the domain error a caller can act on."""
    diag = exc.diag
    code = exc.sqlstate or ""
    message = diag.message_primary or str(exc)
    kind = _CODES.get(code)
    if kind is InvalidInput:
        return InvalidInput(message, field=diag.column_name)
    if kind is not None:
        return kind(message)
    if isinstance(exc, psycopg.DataError) and not code:
        # Raised by psycopg itself before sending, e.g. a NUL character in a text value.
        return InvalidInput(str(exc))
    if isinstance(exc, pg_errors.ForeignKeyViolation):
        field = _CONSTRAINT_FIELDS.get(diag.constraint_name or "")
        return InvalidInput(f"{field or 'reference'} does not exist", field=field)
    if isinstance(exc, pg_errors.CheckViolation | pg_errors.NotNullViolation):
        field = _CONSTRAINT_FIELDS.get(diag.constraint_name or "", diag.column_name)
        return InvalidInput(message, field=field)
    if isinstance(
        exc,
        pg_errors.InvalidTextRepresentation
        | pg_errors.NumericValueOutOfRange
        | pg_errors.StringDataRightTruncation
        | pg_errors.InvalidParameterValue
        | pg_errors.UntranslatableCharacter
        | pg_errors.CharacterNotInRepertoire
        | pg_errors.InvalidDatetimeFormat
        | pg_errors.DatetimeFieldOverflow,
    ):
        return InvalidInput(message)
    for error, reason, text in _BUSY:
        if isinstance(exc, error):
            return Unavailable(text, nothing_done=True, detail={"reason": reason})
    if isinstance(exc, psycopg.OperationalError):
        return unreachable(exc)
    return DispatchError(f"database error: {message}")


def unreachable(exc: Exception) -> Unavailable:
    """The connection broke or could not be made (a killed backend, a restart, the server down):
    what was in flight may or may not have been committed."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return Unavailable(
        f"database unavailable: {message}", retry_after=UNREACHABLE_RETRY_AFTER,
        detail={"reason": "unreachable"},
    )


def _gone(conn: psycopg.AsyncConnection[Any]) -> bool:
    """True when something waits on an idle connection's socket: on a pooled connection that is
    the server's goodbye (its backend was killed, or the server restarted), rarely a notice. A
    healthy idle connection has nothing to read, so the common case costs one poll(2)."""
    if conn.closed or conn.broken:
        return True
    try:
        fd = conn.pgconn.socket
    except psycopg.Error:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


async def _alive(conn: psycopg.AsyncConnection[Any]) -> bool:
    if not _gone(conn):
        return True
    if conn.closed or conn.broken:
        return False
    try:
        await conn.execute("")  # only a round trip tells a notice from a goodbye
    except psycopg.Error:
        return False
    return True


async def _checkout(
    pool: AsyncConnectionPool[Any], timeout: float | None = None
) -> psycopg.AsyncConnection[Any]:
    """A live pooled connection within `timeout` (the pool's by default). A connection the
    server has dropped is closed (the pool replaces it) and the next one taken at once, so no
    request fails on a connection that died while it sat in the pool."""
    wait = pool.timeout if timeout is None else timeout
    deadline = time.monotonic() + wait
    while True:
        try:
            conn = await pool.getconn(timeout=deadline - time.monotonic())
        except PoolTimeout as exc:
            raise Unavailable(
                f"database busy: no pooled connection came free within {wait:g} s "
                "(database.pool_timeout_ms); retry",
                nothing_done=True,
                detail={"reason": "pool_timeout"},
            ) from exc
        if await _alive(conn):
            return conn
        log.info("discarding a pooled connection the server has dropped")
        await conn.close()
        await pool.putconn(conn)


@contextlib.asynccontextmanager
async def connection(
    pool: AsyncConnectionPool[Any], timeout: float | None = None
) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A live pooled connection (see _checkout) within `timeout` seconds (the pool's by
    default); a connection that breaks in use becomes Unavailable, and the pool replaces it."""
    conn = await _checkout(pool, timeout)
    try:
        async with conn:
            yield conn
    except psycopg.OperationalError as exc:
        raise translate(exc) from exc
    finally:
        await pool.putconn(conn)


class ReadableTimestamptz(Loader):
    """timestamptz as psycopg reads it, except that a value Python cannot hold (infinity, or a
    year outside 1..9999 in UTC) reads as the earliest or latest datetime instead of failing the
    whole result. The database refuses such values (dispatch.time_in_range), so only a row written
    around that check can hold one; it must not stop every list or the event relay. Text format,
    which is what every query here uses; costs well under a microsecond per value."""

    _LATEST = datetime.max.replace(tzinfo=UTC)
    _EARLIEST = datetime.min.replace(tzinfo=UTC)

    def __init__(self, oid: int, context: AdaptContext | None = None) -> None:
        super().__init__(oid, context)
        self._inner = _TIMESTAMPTZ_LOADER(oid, context)

    def load(self, data: Buffer) -> datetime:
        try:
            value: datetime = self._inner.load(data)
            return value
        except psycopg.DataError:
            raw = bytes(data)
            return self._EARLIEST if raw.startswith(b"-") or raw.endswith(b"BC") else self._LATEST


_found = psycopg.adapters.get_loader(
    psycopg.adapters.types["timestamptz"].oid, psycopg.pq.Format.TEXT
)
assert _found is not None
_TIMESTAMPTZ_LOADER = _found


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    # msgspec parses and writes jsonb several times faster than the json module.
    set_json_loads(msgspec.json.decode, conn)
    set_json_dumps(msgspec.json.encode, conn)
    conn.adapters.register_loader("timestamptz", ReadableTimestamptz)


def session_settings(database: DatabaseSettings) -> dict[str, str]:
    """What every pooled session must have: UTC (timestamps leave as RFC 3339 UTC), and the lock
    and statement bounds (a stuck row or a runaway statement is a 503, not a hang)."""
    return {
        "TimeZone": "UTC",
        "lock_timeout": f"{database.lock_timeout_ms}ms",
        "statement_timeout": f"{database.statement_timeout_ms}ms",
    }


# Each setting in a form Postgres compares without units: the time zone's name, or milliseconds.
_READ_SETTINGS = (
    "SELECT current_setting('TimeZone') AS \"TimeZone\","
    " (SELECT setting FROM pg_settings WHERE name = 'lock_timeout') AS lock_timeout,"
    " (SELECT setting FROM pg_settings WHERE name = 'statement_timeout') AS statement_timeout,"
    " pg_backend_pid() AS pid"
)
_READ_NAMES = ("TimeZone", "lock_timeout", "statement_timeout", "pid")


async def set_session(conn: psycopg.AsyncConnection[Any], wanted: dict[str, str]) -> None:
    """Make `wanted` this session's settings, in one round trip (a direct connection, or one
    through a session-mode pooler, keeps them until it closes)."""
    query = "SELECT " + ", ".join(f"set_config(%s, %s, false) AS s{i}" for i in range(len(wanted)))
    await conn.execute(query, [v for pair in wanted.items() for v in pair])


_UTC_NAMES = {"utc", "etc/utc", "uct", "etc/uct", "zulu", "etc/zulu", "universal"}


def session_drift(row: dict[str, Any], wanted: dict[str, str]) -> dict[str, str]:
    """The settings of `row` (as _READ_SETTINGS reads them) that differ from `wanted`, each with
    the value found."""
    found: dict[str, str] = {}
    for name, value in wanted.items():
        have = str(row[name])
        if name == "TimeZone":
            same = have.lower() in _UTC_NAMES
        else:
            same = have == value.removesuffix("ms")
        if not same:
            found[name] = have + ("ms" if name != "TimeZone" else "")
    return found


async def read_session(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any]:
    """The settings session_drift checks, and the server process (`pid`) this session runs on."""
    cur = await conn.execute(_READ_SETTINGS)
    row = await cur.fetchone()
    assert row is not None
    values = row.values() if isinstance(row, dict) else row
    return dict(zip(_READ_NAMES, values, strict=True))


def create_pool(
    url: str,
    database: DatabaseSettings | None = None,
    *,
    min_size: int | None = None,
    max_size: int | None = None,
) -> AsyncConnectionPool[Any]:
    """An unopened pool of autocommit UTC connections with dict rows, bounded as `database` says
    (its defaults when None; min_size/max_size override its pool size); open it with wait=True.
    Take connections with `connection(pool)`, which never hands out one the server dropped.

    With database.pool_mode "transaction" (the URL is a transaction-mode pooler such as
    PgBouncer's), a connection sets nothing (a SET would stay on whichever server connection ran
    it, for other clients to inherit) and never prepares a statement (the next transaction may
    run on a server connection that lacks it); the session settings must then be the server's
    defaults, which `dispatch.preflight.check_sessions` checks at start-up."""
    database = database or DatabaseSettings()
    pooled = database.pool_mode == "transaction"
    wanted = session_settings(database)

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await _configure(conn)
        if pooled:
            conn.prepare_threshold = None
        else:
            await set_session(conn, wanted)

    return AsyncConnectionPool(
        url,
        min_size=database.pool_min if min_size is None else min_size,
        max_size=database.pool_max if max_size is None else max_size,
        open=False,
        kwargs={**LINK_KWARGS, "row_factory": dict_row, "connect_timeout": 5},
        configure=configure,
        timeout=database.pool_timeout_ms / 1000,
        reconnect_timeout=RECONNECT_SECONDS,
    )


class HealthProbe:
    """/health's connection to the database, of its own: a pool whose every connection waits on
    a locked row is not a database that is down. Reconnects on demand; a check is bounded by
    `timeout` seconds whatever the server does."""

    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        self.url = url
        self.timeout = timeout
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()

    async def check(self) -> bool:
        """Whether the database answers; a broken connection is replaced once before saying no."""
        return await self.status() == "ok"

    async def status(self) -> str:
        """"ok", "too many clients" (it answers but has no connection slot left for the probe),
        or "down"; a broken connection is replaced once before saying no."""
        state = "down"
        async with self._lock:
            for _ in range(2):
                try:
                    async with asyncio.timeout(self.timeout):
                        if self._conn is None or self._conn.closed or self._conn.broken:
                            # No statement_timeout of its own: through a transaction-mode
                            # pooler a SET would outlive the probe; the asyncio bound holds
                            # anywhere (and a connection it cut short is dropped below).
                            self._conn = await psycopg.AsyncConnection.connect(
                                self.url, **LINK_KWARGS,  # type: ignore[arg-type]
                                connect_timeout=max(1, int(self.timeout)),
                            )
                        await self._conn.execute("SELECT 1")
                    return "ok"
                except (psycopg.Error, OSError, TimeoutError) as exc:
                    # libpq reports the server's refusal at connection time as text only.
                    if any(w in str(exc) for w in ("too many clients", "too many connections")):
                        state = "too many clients"
                    await self._drop()
            return state

    async def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # it is broken already; closing may fail too
                await self._conn.close()
            self._conn = None

    async def close(self) -> None:
        async with self._lock:
            await self._drop()


def start_embedded(data_dir: str | Path) -> str:
    """Start (or reuse) the embedded Postgres in data_dir/pg and return its connection URL."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; pgserver then uses /tmp, which is fine.
        warnings.simplefilter("ignore")
        import pgserver  # imported here: only the embedded default needs it

    pgdata = Path(data_dir).resolve() / "pg"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    # cleanup_mode="stop": the server stops when the last process using it exits; data stays.
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    url: str = server.get_uri()
    log.info("embedded postgres ready", extra={"pgdata": str(pgdata)})
    return url
