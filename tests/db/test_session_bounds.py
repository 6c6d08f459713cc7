"""The bounds of pooled sessions (database.lock_timeout_ms, statement_timeout_ms, pool_timeout_ms)
and the pool's checkout: each limit hit is an Unavailable (503) that says nothing was done, and a
connection whose backend died in the pool is never handed out."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from dispatch import db
from dispatch.broker import Broker
from dispatch.errors import Unavailable
from dispatch.models import Complete
from dispatch.settings import DatabaseSettings
from dispatch.store import Store
from tests.factories import make_running

Sql = psycopg.Connection[dict[str, Any]]
TIGHT = DatabaseSettings(lock_timeout_ms=100, statement_timeout_ms=300, pool_timeout_ms=300)


@pytest.fixture
async def tight_pool(db_url: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    p = db.create_pool(db_url, TIGHT, min_size=1, max_size=1)
    await p.open(wait=True)
    yield p
    await p.close()


async def test_pooled_sessions_carry_the_bounds_and_maintenance_lifts_the_statement_one(
    tight_pool: AsyncConnectionPool[Any],
) -> None:
    async with db.connection(tight_pool) as conn:
        cur = await conn.execute("SELECT current_setting('lock_timeout') AS l,"
                                 " current_setting('statement_timeout') AS s")
        assert await cur.fetchone() == {"l": "100ms", "s": "300ms"}
    async with Store(tight_pool).tasks.maintenance(600_000) as conn:
        cur = await conn.execute("SELECT current_setting('statement_timeout') AS s")
        assert await cur.fetchone() == {"s": "10min"}


async def test_a_statement_past_its_bound_is_unavailable_and_did_nothing(
    tight_pool: AsyncConnectionPool[Any],
) -> None:
    with pytest.raises(Unavailable) as info:
        async with db.connection(tight_pool) as conn:
            await conn.execute("SELECT pg_sleep(5)")
    assert info.value.nothing_done and info.value.detail == {"reason": "statement_timeout"}
    assert "statement_timeout_ms" in info.value.message


async def test_a_locked_task_row_is_unavailable_after_lock_timeout(
    tight_pool: AsyncConnectionPool[Any], broker: Broker, sql: Sql
) -> None:
    task = await make_running(broker, "agent-1")
    bounded = Broker(Store(tight_pool))
    sql.execute("BEGIN")
    sql.execute("SELECT 1 FROM dispatch.tasks WHERE task_id = %s FOR UPDATE", (task.task_id,))
    try:
        with pytest.raises(Unavailable) as info:
            await bounded.apply(
                Complete(task_id=task.task_id, actor="agent-1", result={"ok": True})
            )
    finally:
        sql.execute("ROLLBACK")
    assert info.value.nothing_done and info.value.detail == {"reason": "lock_timeout"}
    assert info.value.retry_after >= 1
    done = await bounded.apply(Complete(task_id=task.task_id, actor="agent-1", result={"ok": True}))
    assert done.result == {"ok": True}


async def test_no_free_connection_within_the_pool_wait_is_unavailable(
    tight_pool: AsyncConnectionPool[Any],
) -> None:
    async with db.connection(tight_pool):
        with pytest.raises(Unavailable) as info:
            async with db.connection(tight_pool):
                pass
    assert info.value.nothing_done and info.value.detail == {"reason": "pool_timeout"}


async def test_a_connection_killed_in_the_pool_is_not_handed_out(
    tight_pool: AsyncConnectionPool[Any], sql: Sql
) -> None:
    store = Store(tight_pool)
    async with db.connection(tight_pool) as conn:
        pid = conn.info.backend_pid
    sql.execute("SELECT pg_terminate_backend(%s)", (pid,))
    deadline = time.monotonic() + 10
    while sql.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchall():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # The pool's only connection is dead; the call gets a fresh one instead of the 503.
    assert (await store.config.get())["max_concurrent_per_agent"] >= 1
    async with db.connection(tight_pool) as conn:
        assert conn.info.backend_pid != pid
