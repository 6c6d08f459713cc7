"""Connections: the async pool, the embedded Postgres, and psycopg errors -> Dispatch errors."""

from __future__ import annotations

import contextlib
import logging
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

log = logging.getLogger(__name__)

# Every session speaks UTC so that timestamps leave as RFC 3339 UTC.
CONNECT_KWARGS: dict[str, object] = {"autocommit": True, "options": "-c TimeZone=UTC"}

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
    if isinstance(exc, psycopg.OperationalError | pg_errors.AdminShutdown):
        return Unavailable(f"database unavailable: {message}")
    return DispatchError(f"database error: {message}")


@contextlib.asynccontextmanager
async def connection(pool: AsyncConnectionPool[Any]) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A pooled connection; a pool timeout or a refused connection becomes Unavailable."""
    try:
        async with pool.connection() as conn:
            yield conn
    except (PoolTimeout, psycopg.OperationalError) as exc:
        raise Unavailable(f"database unavailable: {exc}") from exc


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


def create_pool(url: str, *, min_size: int = 2, max_size: int = 10) -> AsyncConnectionPool[Any]:
    """An unopened pool of autocommit UTC connections with dict rows; open it with wait=True."""
    return AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        open=False,
        kwargs={**CONNECT_KWARGS, "row_factory": dict_row},
        configure=_configure,
        timeout=10.0,
    )


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
