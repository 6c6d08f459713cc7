"""Waiting for a signal without holding a slot, enforced in SQL: the agent suspends its running
task (slot free, lease over), a signal puts the payload on the task and gives it back (to the same
agent when it may take it), a wait that runs out fails the attempt."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from dispatch.broker import Broker
from dispatch.errors import Conflict, Forbidden, InvalidInput
from dispatch.models import Complete, Progress, Signal, Suspend, TaskStatus
from tests.factories import T0, at, event_names, make_running, make_task

Sql = psycopg.Connection[dict[str, Any]]


def active(sql: Sql, agent: str) -> int:
    row = sql.execute("SELECT dispatch.agent_active(%s) AS n", (agent,)).fetchone()
    assert row is not None
    return int(row["n"])


async def test_suspend_frees_the_slot_and_a_signal_gives_the_task_back(
    broker: Broker, sql: Sql
) -> None:
    t = await make_running(broker, title="needs an answer")
    first_lease = t.lease
    t = await broker.apply(Suspend(task_id=t.task_id, agent_id="agent-1",
                                   waiting_for="the customer's reply", timeout_seconds=3600,
                                   lease=t.lease), now=at(10))
    assert t.status is TaskStatus.SUSPENDED and t.waiting_for == "the customer's reply"
    assert t.deadline_at == at(3610) and active(sql, "agent-1") == 0
    # Its lease is over: a late report of the suspended attempt is stale.
    with pytest.raises(Conflict):
        await broker.apply(Progress(task_id=t.task_id, agent_id="agent-1", percent=50,
                                    lease=first_lease))
    held = await broker.tasks.hold(t.task_id)
    assert held["reasons"][0].startswith("suspended by agent-1 until a signal")
    with pytest.raises(Forbidden):
        await broker.apply(Signal(task_id=t.task_id, actor="mallory", payload=1))

    t = await broker.apply(Signal(task_id=t.task_id, actor="req", payload={"reply": "yes"}),
                           now=at(20))
    assert t.status is TaskStatus.ASSIGNED and t.assigned_agent == "agent-1"
    assert t.signal == {"reply": "yes"} and t.lease != first_lease
    assert (await event_names(broker, t))[-3:] == ["suspended", "signalled", "assigned"]
    # The agent's claim hands it back first; it finishes with the answer.
    [again] = await broker.claim_many("agent-1", start=True, now=at(21))
    assert again.task_id == t.task_id and again.status is TaskStatus.RUNNING
    done = await broker.apply(Complete(task_id=t.task_id, actor="agent-1", result="thanks",
                                       lease=again.lease))
    assert done.status is TaskStatus.COMPLETED and done.retry_count == 0
    with pytest.raises(Conflict, match="not waiting for a signal"):
        await broker.apply(Signal(task_id=t.task_id, actor="req"))


async def test_a_signal_queues_the_task_when_its_agent_cannot_take_it(broker: Broker) -> None:
    t = await make_running(broker, title="waits")
    await broker.apply(Suspend(task_id=t.task_id, agent_id="agent-1", waiting_for="x",
                               timeout_seconds=60))
    await broker.agents.drain("agent-1", True)
    t = await broker.apply(Signal(task_id=t.task_id, actor="req", payload=[1, 2]))
    assert t.status is TaskStatus.PENDING and t.assigned_agent is None
    assert t.previous_agents == ["agent-1"] and t.signal == [1, 2]


async def test_a_wait_that_runs_out_fails_the_attempt(broker: Broker) -> None:
    t = await make_running(broker, max_retries=1)
    await broker.apply(Suspend(task_id=t.task_id, agent_id="agent-1", waiting_for="approval mail",
                               timeout_seconds=30), now=T0)
    assert await broker.tasks.seconds_until_due(now=at(0)) == pytest.approx(30)
    assert await broker.expire(now=at(29)) == []
    [expired] = await broker.expire(now=at(30))
    assert expired.event == "timeout" and expired.status == TaskStatus.PENDING
    t = await broker.tasks.get(t.task_id)
    assert t.retry_count == 1 and t.error == "no signal in time: approval mail"


async def test_bad_suspensions_are_refused(broker: Broker) -> None:
    t = await make_running(broker)
    for waiting_for, seconds in (("", 10), ("x", 0), ("x", 10**9)):
        with pytest.raises(InvalidInput):
            await broker.apply(Suspend(task_id=t.task_id, agent_id="agent-1",
                                       waiting_for=waiting_for, timeout_seconds=seconds))
    with pytest.raises(Forbidden):
        await broker.apply(Suspend(task_id=t.task_id, agent_id="someone-else", waiting_for="x",
                                   timeout_seconds=10))
    pending = await make_task(broker)
    with pytest.raises(Conflict):
        await broker.apply(Signal(task_id=pending.task_id, actor="req"))


async def test_100_suspended_tasks_signalled_at_once_each_resume_once(
    broker: Broker, sql: Sql
) -> None:
    await broker.agents.upsert("agent-1", capabilities=[], max_concurrent=100)
    tasks = [await make_task(broker, title=f"t{i}") for i in range(100)]
    claimed = await broker.claim_many("agent-1", max_tasks=100, start=True, now=at(1))
    assert len(claimed) == 100
    for t in claimed:
        await broker.apply(Suspend(task_id=t.task_id, agent_id="agent-1", waiting_for="go",
                                   timeout_seconds=600, lease=t.lease))
    assert active(sql, "agent-1") == 0

    async def signal_twice(task_id: Any) -> int:
        """Two senders at once: one resumes it, the other is told it no longer waits."""
        outcomes = await asyncio.gather(
            broker.apply(Signal(task_id=task_id, actor="req", payload="a")),
            broker.apply(Signal(task_id=task_id, actor="req", payload="b")),
            return_exceptions=True)
        assert sum(isinstance(o, Conflict) for o in outcomes) == 1, outcomes
        return 1

    assert sum(await asyncio.gather(*(signal_twice(t.task_id) for t in tasks))) == 100
    rows = sql.execute(
        "SELECT t.status::text AS status, count(e.*) FILTER (WHERE e.event = 'signalled') AS n"
        " FROM dispatch.tasks t JOIN dispatch.task_events e USING (task_id)"
        " GROUP BY t.task_id, t.status").fetchall()
    # Each resumed once: back with its agent, or (when the agent's free slot was being taken by
    # another signal at that instant) in the queue.
    assert len(rows) == 100 and all(r["n"] == 1 for r in rows)
    assert {r["status"] for r in rows} <= {"assigned", "pending"}
    # No slot given twice.
    row = sql.execute("SELECT count(*) AS n, count(DISTINCT slot) AS slots FROM dispatch.tasks"
                      " WHERE status = 'assigned'").fetchone()
    assert row is not None and row["n"] == row["slots"] == active(sql, "agent-1") > 0
