"""The engine phase's agents send their completions as the SDK's worker does: those ready
together leave in one request, whose `next` gives each freed slot a task of its own, started; in
pull mode an agent claims for its idle slots only."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg

from bench.common import Latencies
from bench.engine import Reports, drain_pull
from dispatch.broker import Broker
from dispatch.models import NewTask

Sql = psycopg.Connection[dict[str, Any]]


async def test_completions_ready_together_go_in_one_request_and_each_slot_gets_its_next(
    broker: Broker, sql: Sql
) -> None:
    await broker.agents.upsert("slots", max_concurrent=3)
    for i in range(6):
        await broker.submit(NewTask(title=f"t{i}"), requester="bench")
    held = await broker.claim_many("slots", max_tasks=3, start=True)
    assert len(held) == 3
    reports = Reports(broker, "slots")
    sender = asyncio.create_task(reports.send())
    try:
        following = await asyncio.gather(*(reports.complete(t) for t in held))
    finally:
        sender.cancel()
    assert reports.requests == 1
    rows = sql.execute("SELECT task_id, status::text, assigned_agent FROM dispatch.tasks"
                       ).fetchall()
    status = {r["task_id"]: (r["status"], r["assigned_agent"]) for r in rows}
    assert all(status[t.task_id] == ("completed", "slots") for t in held)
    nexts = [t.task_id for t in following if t is not None]
    assert len(set(nexts)) == 3 and not set(nexts) & {t.task_id for t in held}
    assert all(status[i] == ("running", "slots") for i in nexts)


async def test_a_completion_alone_goes_alone(broker: Broker, sql: Sql) -> None:
    await broker.agents.upsert("one", max_concurrent=1)
    for i in range(2):
        await broker.submit(NewTask(title=f"t{i}"), requester="bench")
    [held] = await broker.claim_many("one", start=True)
    reports = Reports(broker, "one")
    sender = asyncio.create_task(reports.send())
    try:
        following = await reports.complete(held)
        assert following is not None
        assert await reports.complete(following) is None  # nothing left to claim
    finally:
        sender.cancel()
    assert reports.requests == 2
    row = sql.execute("SELECT count(*) AS n FROM dispatch.tasks WHERE status = 'completed'"
                      ).fetchone()
    assert row is not None and row["n"] == 2


async def test_the_pull_drain_claims_for_idle_slots_and_completes_every_task_once(
    broker: Broker, sql: Sql
) -> None:
    agents = ["pull-0", "pull-1"]
    for agent in agents:
        await broker.agents.upsert(agent, max_concurrent=3)
    for i in range(20):
        await broker.submit(NewTask(title=f"t{i}"), requester="bench")
    claims = Latencies()
    _, requests = await drain_pull(broker, agents, 3, 20, claims)
    rows = sql.execute(
        "SELECT t.status::text, t.assigned_agent,"
        " (SELECT count(*) FROM dispatch.task_events e"
        "  WHERE e.task_id = t.task_id AND e.event = 'started') AS starts"
        " FROM dispatch.tasks t").fetchall()
    assert len(rows) == 20
    assert all(r["status"] == "completed" and r["assigned_agent"] in agents for r in rows)
    assert all(r["starts"] == 1 for r in rows)
    # Completions that are ready together share a request, whose next refills their slots.
    assert requests < 20
