"""SKIP LOCKED under contention, the agent semaphore, the claim's plan, NOTIFY."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from dispatch.broker import Broker
from dispatch.db import CONNECT_KWARGS
from dispatch.models import NewTask
from dispatch.notify import WORK_CHANNEL, Listener


async def test_eight_connections_claim_a_thousand_tasks_exactly_once(
    broker: Broker, db_url: str, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    sql.execute(
        "INSERT INTO dispatch.tasks (title, requester) SELECT 't' || g, 'r'"
        " FROM generate_series(1, 1000) g"
    )
    agents = [f"worker-{i}" for i in range(8)]
    for a in agents:
        await broker.agents.upsert(a, max_concurrent=1000)

    async def worker(agent: str) -> list[str]:
        claimed: list[str] = []
        async with await psycopg.AsyncConnection.connect(db_url, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
            while True:
                cur = await conn.execute("SELECT task_id FROM dispatch.task_claim(%s)", (agent,))
                row = await cur.fetchone()
                if row is None:
                    return claimed
                claimed.append(str(row[0]))

    started = time.perf_counter()
    results = await asyncio.gather(*(worker(a) for a in agents))
    elapsed = time.perf_counter() - started
    everything = [t for r in results for t in r]
    assert len(everything) == 1000
    assert len(set(everything)) == 1000
    assert all(len(r) > 0 for r in results), [len(r) for r in results]
    rows = sql.execute(
        "SELECT count(*) FILTER (WHERE status = 'assigned') AS assigned,"
        " count(*) FILTER (WHERE event = 'assigned') AS events"
        " FROM dispatch.tasks JOIN dispatch.task_events USING (task_id)"
    ).fetchone()
    assert rows is not None and rows["events"] == 1000
    load = sql.execute(
        "SELECT sum(active_tasks) AS a, sum(slots_held) AS c FROM dispatch.agent_load"
    ).fetchone()
    assert load == {"a": 1000, "c": 1000}
    print(
        f"\n8 connections claimed 1000 tasks in {elapsed:.3f}s "
        f"({1000 / elapsed:.0f} claims/s); per worker {[len(r) for r in results]}"
    )


async def test_concurrent_assigners_respect_every_agent_limit(
    pool: AsyncConnectionPool[Any], db_url: str, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    """Four assigners and eight pull-claimers race over 400 tasks and 10 agents of limit 3."""
    sql.execute(
        "INSERT INTO dispatch.tasks (title, requester) SELECT 't' || g, 'r'"
        " FROM generate_series(1, 400) g"
    )
    for i in range(10):
        sql.execute("SELECT dispatch.agent_upsert(%s, p_max_concurrent => 3)", (f"a{i}",))

    async def assigner() -> int:
        n = 0
        async with await psycopg.AsyncConnection.connect(db_url, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
            for _ in range(20):
                cur = await conn.execute("SELECT count(*) FROM dispatch.task_assign(7)")
                row = await cur.fetchone()
                n += row[0] if row else 0
        return n

    async def claimer(agent: str) -> int:
        n = 0
        async with await psycopg.AsyncConnection.connect(db_url, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
            for _ in range(10):
                cur = await conn.execute("SELECT task_id FROM dispatch.task_claim(%s)", (agent,))
                n += len(await cur.fetchall())
        return n

    await asyncio.gather(*(assigner() for _ in range(4)), *(claimer(f"a{i}") for i in range(8)))
    over = sql.execute(
        "SELECT assigned_agent, count(*) AS n FROM dispatch.tasks"
        " WHERE status IN ('assigned', 'running') GROUP BY assigned_agent HAVING count(*) > 3"
    ).fetchall()
    assert over == []
    load = sql.execute(
        "SELECT count(*) FILTER (WHERE active_tasks <> slots_held) AS drift,"
        " sum(active_tasks) AS active FROM dispatch.agent_load"
    ).fetchone()
    assert load == {"drift": 0, "active": 30}


_CLAIM_QUERY = (
    "EXPLAIN (FORMAT JSON) SELECT * FROM dispatch.tasks tk"
    " WHERE tk.status = 'pending' AND NOT tk.parked AND tk.available_at <= now()"
    "   AND tk.required_capabilities <@ '{}'::text[]"
    " ORDER BY tk.queue_priority DESC, tk.queue_at LIMIT 1 FOR UPDATE SKIP LOCKED"
)


def _claim_plan(sql: psycopg.Connection[dict[str, Any]]) -> str:
    """The plan of task_claim's pending-row query (the statement inside the function)."""
    sql.execute("ANALYZE dispatch.tasks")
    row = sql.execute(_CLAIM_QUERY).fetchone()
    assert row is not None
    return json.dumps(row["QUERY PLAN"])


def _bulk_terminal(sql: psycopg.Connection[dict[str, Any]], n: int) -> None:
    sql.execute("SET session_replication_role = replica")  # bulk load without per-row triggers
    sql.execute(
        "INSERT INTO dispatch.tasks (title, requester, owner, source, timeout_seconds, status,"
        " completed_at) SELECT 't', 'r', 'r', 'sql', 300, 'completed', now()"
        " FROM generate_series(1, %s)",
        (n,),
    )
    sql.execute("SET session_replication_role = DEFAULT")


def test_claim_uses_the_pending_partial_index(sql: psycopg.Connection[dict[str, Any]]) -> None:
    # 50,000 rows: history that the claim must never scan, then a backlog of pending work.
    _bulk_terminal(sql, 45_000)
    sql.execute(
        "INSERT INTO dispatch.tasks (title, requester, priority)"
        " SELECT 'p', 'r', g % 10 FROM generate_series(1, 5000) g"
    )
    plan = _claim_plan(sql)
    assert "Seq Scan" not in plan, plan
    assert '"Index Name": "tasks_pending_order_idx"' in plan, plan
    assert '"Node Type": "Sort"' not in plan, plan


def test_claim_on_a_short_queue_stays_on_pending_indexes(
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    _bulk_terminal(sql, 49_990)
    sql.execute(
        "INSERT INTO dispatch.tasks (title, requester) SELECT 'p', 'r' FROM generate_series(1, 10)"
    )
    plan = _claim_plan(sql)
    assert "Seq Scan" not in plan, plan
    assert '"Index Name": "tasks_pending_' in plan, plan


async def test_notify_wakes_a_listener_on_create(broker: Broker, db_url: str) -> None:
    listener = Listener(db_url)
    await listener.start()
    try:
        woken = listener.event(WORK_CHANNEL)
        await broker.submit(NewTask(title="wake up"), requester="r")
        await asyncio.wait_for(woken.wait(), 5)
    finally:
        await listener.stop()


async def test_batch_insert_notifies_once(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("LISTEN dispatch_work")
        conn.execute("INSERT INTO dispatch.tasks (title) SELECT 't' FROM generate_series(1, 50)")
        notes = list(conn.notifies(timeout=1))
    assert [n.channel for n in notes] == ["dispatch_work"]


def test_a_round_says_whether_another_would_give_more(sql: Any) -> None:
    """task_assign's `more`: true when it stopped at its batch size with work left, false when
    its walk reached the end of what it could give (the assigner then runs no empty round)."""
    sql.execute("SELECT dispatch.agent_upsert('a1', p_max_concurrent => 10)")
    sql.execute("INSERT INTO dispatch.tasks (title) SELECT 't' || g FROM generate_series(1, 3) g")
    first = sql.execute("SELECT task_id, more FROM dispatch.task_assign(2)").fetchall()
    assert [r["more"] for r in first] == [True, True]
    last = sql.execute("SELECT task_id, more FROM dispatch.task_assign(2)").fetchall()
    assert [r["more"] for r in last] == [False]
    assert sql.execute("SELECT * FROM dispatch.task_assign(2)").fetchall() == []
    # The agent's room, not the batch, ends the walk: nothing more for anyone now.
    sql.execute("SELECT dispatch.agent_upsert('a2', p_max_concurrent => 1)")
    sql.execute("SELECT dispatch.drain_agent('a1')")
    sql.execute("INSERT INTO dispatch.tasks (title) SELECT 'u' || g FROM generate_series(1, 3) g")
    only = sql.execute("SELECT agent_id, more FROM dispatch.task_assign(2)").fetchall()
    assert only == [{"agent_id": "a2", "more": False}]


def fresh_statistics(sql: psycopg.Connection[dict[str, Any]]) -> None:
    """What this session did, in the statistics views from its next read on."""
    sql.execute("SELECT pg_stat_force_next_flush()")
    sql.execute("SELECT 1")  # the flush happens at the end of a transaction
    sql.execute("SELECT pg_stat_clear_snapshot()")


def test_repeated_claims_walk_the_order_index(sql: psycopg.Connection[dict[str, Any]]) -> None:
    """The plans cached inside task_claim/task_assign (no ANALYZE, as right after a burst of
    creates) read pending rows in index order instead of reading all of them and sorting."""
    sql.execute(
        "INSERT INTO dispatch.tasks (title, requester, priority)"
        " SELECT 'p', 'r', g % 10 FROM generate_series(1, 3000) g"
    )
    sql.execute("SELECT dispatch.agent_upsert('a1', p_max_concurrent => 1000)")
    for _ in range(20):
        sql.execute("SELECT * FROM dispatch.task_claim('a1')")
    sql.execute("SELECT count(*) FROM dispatch.task_assign(10)")
    fresh_statistics(sql)
    rows = sql.execute(
        "SELECT indexrelname AS name, idx_tup_read FROM pg_stat_user_indexes"
        " WHERE indexrelname IN ('tasks_pending_order_idx', 'tasks_pending_deferred_idx')"
    ).fetchall()
    read = {r["name"]: r["idx_tup_read"] for r in rows}
    # 20 claims that each read all 3,000 pending rows would read 60,000 tuples.
    assert read["tasks_pending_deferred_idx"] == 0, read
    assert 0 < read["tasks_pending_order_idx"] < 3000, read


def test_a_batch_given_looks_each_task_up_by_its_key(
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    """Claims and rounds give a batch of tasks in one call (tasks_give): its plans, cached inside
    the functions with no ANALYZE, look each task up by its key and never read the whole table."""
    sql.execute(
        "INSERT INTO dispatch.tasks (title, requester, priority)"
        " SELECT 'p', 'r', g % 10 FROM generate_series(1, 3000) g"
    )
    for agent in ("a1", "a2", "a3"):
        sql.execute("SELECT dispatch.agent_upsert(%s, p_max_concurrent => 1000)", (agent,))

    def seq_scans() -> int:
        fresh_statistics(sql)
        row = sql.execute(
            "SELECT seq_scan FROM pg_stat_user_tables"
            " WHERE schemaname = 'dispatch' AND relname = 'tasks'"
        ).fetchone()
        assert row is not None
        return int(row["seq_scan"])

    before = seq_scans()
    given = 0
    for _ in range(10):
        given += len(sql.execute(
            "SELECT * FROM dispatch.task_claim('a1', p_max => 10, p_start => true)").fetchall())
        given += len(sql.execute("SELECT * FROM dispatch.task_assign(10)").fetchall())
    assert given == 200
    assert seq_scans() == before
    held = sql.execute(
        "SELECT assigned_agent AS agent, status, count(*) AS n FROM dispatch.tasks"
        " WHERE status <> 'pending' GROUP BY 1, 2 ORDER BY 1, 2"
    ).fetchall()
    assert held == [
        {"agent": "a1", "status": "running", "n": 100},
        {"agent": "a2", "status": "assigned", "n": 50},
        {"agent": "a3", "status": "assigned", "n": 50},
    ], held


def test_one_unmatched_report_per_database_however_many_reapers(
    sql: psycopg.Connection[dict[str, Any]], db_url: str
) -> None:
    """Every serve worker runs the reaper: two reports at once write one `unmatched` event per
    task, not one each."""
    sql.execute("SELECT dispatch.create_task('needs a gpu', required_capabilities => '{gpu}')")
    with psycopg.connect(db_url, row_factory=dict_row, **CONNECT_KWARGS) as first:  # type: ignore[arg-type]
        with first.transaction():
            mine = first.execute("SELECT dispatch.task_report_unmatched() AS n").fetchone()
            other = sql.execute("SELECT dispatch.task_report_unmatched() AS n").fetchone()
            assert (mine, other) == ({"n": 1}, {"n": 0})
        # Committed: the next report sees the event and waits for unmatched_repeat_ms.
        assert sql.execute("SELECT dispatch.task_report_unmatched() AS n").fetchone() == {"n": 0}
    assert sql.execute(
        "SELECT count(*) AS n FROM dispatch.task_events WHERE event = 'unmatched'"
    ).fetchone() == {"n": 1}
