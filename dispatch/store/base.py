"""What every part of the data layer shares: the pool, borrowing a connection or running in the
caller's (`conn=`, so several calls make one transaction), and translating psycopg errors."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, TypeVar

import msgspec
import psycopg
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from dispatch import db
from dispatch.models import Task

Conn = AsyncConnection[Any]
Row = Mapping[str, Any]
Params = Sequence[object] | Mapping[str, object]
S = TypeVar("S", bound=msgspec.Struct)


def convert(row: Row, kind: type[S]) -> S:
    return msgspec.convert(row, kind, from_attributes=False)


def jsonb(value: object) -> Jsonb | None:
    return None if value is None else Jsonb(value)


class Queries:
    """One role's SQL calls over the shared pool. Methods take an optional `conn`; without one
    they borrow a pooled connection. No decisions are made here; `now` parameters are an
    injected clock for tests (None: the database's clock)."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self.pool = pool

    @contextlib.asynccontextmanager
    async def _borrow(self, conn: Conn | None) -> AsyncIterator[Conn]:
        if conn is not None:
            yield conn
            return
        async with db.connection(self.pool) as pooled:
            yield pooled

    @contextlib.asynccontextmanager
    async def _borrow_transaction(self, conn: Conn | None) -> AsyncIterator[Conn]:
        """`conn` as it is, or a pooled connection inside one transaction."""
        if conn is not None:
            yield conn
            return
        async with self.transaction() as pooled:
            yield pooled

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        """A pooled connection inside one transaction; pass it as `conn=` to any role's
        methods."""
        async with db.connection(self.pool) as conn, conn.transaction():
            yield conn

    @contextlib.asynccontextmanager
    async def maintenance(self, statement_timeout_ms: int) -> AsyncIterator[Conn]:
        """A transaction whose statements may run up to statement_timeout_ms instead of the
        pool's bound (database.statement_timeout_ms): for background maintenance whose batches
        may legitimately take longer than a request should. Lock waits keep the pool's bound."""
        async with self.transaction() as conn:
            await self._rows(
                "SELECT set_config('statement_timeout', %s, true)",
                (str(statement_timeout_ms),),
                conn,
            )
            yield conn

    @contextlib.asynccontextmanager
    async def exclusive(self, key: int) -> AsyncIterator[bool]:
        """Hold the advisory lock `key` for the block if no other replica holds it; yields
        whether it was taken (the block should do nothing when it was not). The lock is a
        transaction's, held by a pooled connection idle in its transaction until the block ends:
        a session lock would stay behind on whichever server connection a transaction-mode
        pooler ran it on. The transaction takes no snapshot between statements, so it holds back
        no vacuum."""
        async with self.transaction() as conn:
            rows = await self._rows("SELECT pg_try_advisory_xact_lock(%s) AS ok", (key,), conn)
            yield bool(rows[0]["ok"])

    async def _rows(self, query: Any, params: Params, conn: Conn | None) -> list[Row]:
        async with self._borrow(conn) as c:
            try:
                cur = await c.execute(query, params)
                return await cur.fetchall()
            except psycopg.Error as exc:
                raise db.translate(exc) from exc

    async def _task(self, query: str, params: Params, conn: Conn | None) -> Task:
        rows = await self._rows(query, params, conn)
        return convert(rows[0], Task)

    async def _count(self, query: str, params: Params, conn: Conn | None) -> int:
        rows = await self._rows(query, params, conn)
        return int(rows[0]["n"])
