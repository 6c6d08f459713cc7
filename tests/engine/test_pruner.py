"""Retention: terminal tasks older than retention.hours go, with their history; others stay."""

from __future__ import annotations

from typing import Any

import psycopg

from dispatch.broker import Broker
from dispatch.engine.pruner import PRUNE_LOCK_KEY, Pruner
from dispatch.models import Cancel, Complete, Start, TaskStatus
from tests.factories import at, make_task

HOUR = 3600.0


async def test_pruner_deletes_old_terminal_tasks_only(
    broker: Broker, sql: psycopg.Connection[Any]
) -> None:
    await broker.agents.upsert("a", max_concurrent=10)
    old_done = await make_task(broker, title="old and done")
    old_running = await make_task(broker, title="old and still running", timeout_seconds=10**6)
    await broker.assign(now=at(0))
    await broker.apply(
        Complete(task_id=old_done.task_id, actor="a", result={"ok": True}), now=at(1)
    )
    await broker.apply(Start(task_id=old_running.task_id, agent_id="a"), now=at(1))
    recent = await make_task(broker, title="recently cancelled")
    await broker.apply(
        Cancel(task_id=recent.task_id, actor="req", reason="no longer needed"), now=at(47 * HOUR)
    )
    pending = await make_task(broker, title="old but pending", required_capabilities=["nobody"])

    pruner = Pruner(broker, retention_hours=24)
    assert await pruner.run_once(now=at(48 * HOUR)) == 1
    left = {r["title"] for r in sql.execute("SELECT title FROM dispatch.tasks").fetchall()}
    assert left == {"old and still running", "recently cancelled", "old but pending"}
    gone = sql.execute(
        "SELECT count(*) AS n FROM dispatch.task_events WHERE task_id = %s", (old_done.task_id,)
    ).fetchone()
    assert gone == {"n": 0}
    assert (await broker.tasks.get(pending.task_id)).status is TaskStatus.PENDING


async def test_one_replica_prunes_at_a_time(
    broker: Broker, sql: psycopg.Connection[Any]
) -> None:
    await broker.agents.upsert("a")
    task = await make_task(broker)
    await broker.assign(now=at(0))
    await broker.apply(Complete(task_id=task.task_id, actor="a", result={}), now=at(1))
    pruner = Pruner(broker, retention_hours=1)
    sql.execute("SELECT pg_advisory_lock(%s)", (PRUNE_LOCK_KEY,))
    assert await pruner.run_once(now=at(2 * HOUR)) is None
    sql.execute("SELECT pg_advisory_unlock(%s)", (PRUNE_LOCK_KEY,))
    assert await pruner.run_once(now=at(2 * HOUR)) == 1
