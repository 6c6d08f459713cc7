"""Timeouts, retries to another agent, exhaustion and the dead letter, wake timeout and unmatched
reports, through the reaper's SQL calls with an injected clock."""

from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool

from dispatch.broker import Broker
from dispatch.models import AgentStatus, Fail, Progress, Start, TaskStatus
from dispatch.settings import AssignmentSettings
from dispatch.store import Store
from tests.factories import at, event_names, make_task


async def test_timeout_retries_on_another_agent_then_dead_letters(broker: Broker) -> None:
    await broker.agents.upsert("a")
    await broker.agents.upsert("b")
    task = await make_task(broker, timeout_seconds=10, max_retries=1)

    [first] = await broker.assign(now=at(0))
    await broker.apply(Start(task_id=task.task_id, agent_id=first.agent_id), now=at(1))
    assert await broker.expire(now=at(9)) == []  # not yet
    [ended] = await broker.expire(now=at(10))
    assert (ended.event, ended.status) == ("timeout", TaskStatus.PENDING)
    retried = await broker.tasks.get(task.task_id)
    assert retried.retry_count == 1 and retried.previous_agents == [first.agent_id]
    assert retried.available_at > at(10)  # backoff

    assert await broker.assign(now=at(10)) == []  # still backing off
    [second] = await broker.assign(now=at(60))
    assert second.agent_id != first.agent_id

    [ended] = await broker.expire(now=at(71))
    assert (ended.event, ended.status) == ("timeout", TaskStatus.TIMED_OUT)
    final = await broker.tasks.get(task.task_id)
    assert final.status is TaskStatus.TIMED_OUT
    names = await event_names(broker, task)
    assert names == [
        "created", "assigned", "started", "timeout", "retry", "assigned", "timeout", "dlq",
    ]
    dlq = (await broker.tasks.events(task.task_id))[-1]
    assert dlq.payload["reason"] == "retries exhausted"
    assert (dlq.payload["retry_count"], dlq.payload["max_retries"]) == (1, 1)
    for name in ("a", "b"):
        assert (await broker.agents.get(name)).active_tasks == 0


async def test_silent_agent_times_out_on_its_heartbeat(broker: Broker) -> None:
    await broker.agents.upsert("a")
    task = await make_task(broker, timeout_seconds=3600, heartbeat_seconds=30, max_retries=0)
    await broker.assign(now=at(0))
    await broker.apply(Start(task_id=task.task_id, agent_id="a"), now=at(1))
    await broker.apply(Progress(task_id=task.task_id, agent_id="a", percent=10), now=at(20))
    assert await broker.expire(now=at(49)) == []  # 29 s since the last progress
    [ended] = await broker.expire(now=at(50))
    assert ended.status is TaskStatus.TIMED_OUT
    timeout = next(e for e in await broker.tasks.events(task.task_id) if e.event == "timeout")
    assert timeout.payload["reason"] == "heartbeat"


async def test_failed_task_retries_elsewhere_and_dead_letters(broker: Broker) -> None:
    await broker.agents.upsert("a")
    await broker.agents.upsert("b")
    task = await make_task(broker, max_retries=1)
    [first] = await broker.assign(now=at(0))
    await broker.apply(
        Fail(task_id=task.task_id, agent_id=first.agent_id, error="crashed"), now=at(1)
    )
    [second] = await broker.assign(now=at(60))
    assert second.agent_id != first.agent_id
    failed = await broker.apply(
        Fail(task_id=task.task_id, agent_id=second.agent_id, error="crashed again"), now=at(61)
    )
    assert failed.status is TaskStatus.FAILED
    assert (await event_names(broker, task))[-2:] == ["failed", "dlq"]


async def test_sleeping_agent_that_never_wakes_loses_the_task(
    pool: AsyncConnectionPool[Any],
) -> None:
    broker = Broker(
        Store(pool), assignment=AssignmentSettings(wake_timeout_ms=5000)
    )
    await broker.apply_config()
    await broker.agents.upsert("sleepy", status=AgentStatus.SLEEPING)
    await broker.agents.upsert("busy", status=AgentStatus.BUSY)
    task = await make_task(broker, timeout_seconds=600)
    [made] = await broker.assign(now=at(0))
    assert (made.agent_id, made.wake) == ("sleepy", True)
    assert await broker.expire(now=at(4.9)) == []
    [ended] = await broker.expire(now=at(5))
    assert (ended.event, ended.status) == ("reassigned", TaskStatus.PENDING)
    back = await broker.tasks.get(task.task_id)
    assert back.retry_count == 1  # it counts as an attempt
    [again] = await broker.assign(now=at(5))  # no backoff for a reassignment
    assert again.agent_id == "busy"
    events = await broker.tasks.events(task.task_id)
    reassigned = next(e for e in events if e.event == "reassigned")
    assert reassigned.payload == {"previous_agent": "sleepy", "reason": "wake_timeout"}


async def test_an_agent_that_wakes_in_time_keeps_the_task(pool: AsyncConnectionPool[Any]) -> None:
    broker = Broker(
        Store(pool), assignment=AssignmentSettings(wake_timeout_ms=5000)
    )
    await broker.apply_config()
    await broker.agents.upsert("sleepy", status=AgentStatus.SLEEPING)
    task = await make_task(broker, timeout_seconds=600)
    await broker.assign(now=at(0))
    await broker.apply(Start(task_id=task.task_id, agent_id="sleepy"), now=at(4))
    assert await broker.expire(now=at(30)) == []
    assert (await broker.tasks.get(task.task_id)).status is TaskStatus.RUNNING


async def test_unmatched_is_reported_once_then_after_the_repeat_interval(
    pool: AsyncConnectionPool[Any],
) -> None:
    broker = Broker(
        Store(pool),
        assignment=AssignmentSettings(unmatched_repeat_ms=60_000),
    )
    await broker.apply_config()
    await broker.agents.upsert("writer", capabilities=["prose"])
    task = await make_task(broker, required_capabilities=["gpu"])
    assert await broker.tasks.report_unmatched(now=at(1)) == 1
    assert await broker.tasks.report_unmatched(now=at(2)) == 0
    assert await broker.tasks.report_unmatched(now=at(59)) == 0
    assert await broker.tasks.report_unmatched(now=at(61)) == 1
    unmatched = [e for e in await broker.tasks.events(task.task_id) if e.event == "unmatched"]
    assert len(unmatched) == 2
    assert unmatched[0].payload == {"required_capabilities": ["gpu"], "owner": None}
    # A busy-but-capable agent is a match: no report for capacity alone.
    await broker.agents.upsert("gpu-box", capabilities=["gpu"], max_concurrent=1)
    assert await broker.tasks.report_unmatched(now=at(200)) == 0
