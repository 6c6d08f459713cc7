"""Retries with backoff, exhaustion, timeouts, heartbeats and wake timeouts (injected clock)."""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest

from dispatch.broker import Broker
from dispatch.errors import Conflict, Forbidden
from dispatch.models import AgentStatus, Cancel, Complete, Fail, Progress, Start, TaskStatus
from dispatch.settings import AssignmentSettings
from tests.factories import T0, at, event_names, make_running, make_task


@pytest.fixture
def assignment_settings() -> AssignmentSettings:
    return AssignmentSettings(
        retry_backoff_ms=1000,
        retry_backoff_max_ms=5000,
        wake_timeout_ms=30000,
    )


async def test_fail_retries_with_exponential_backoff_then_dead_letters(broker: Broker) -> None:
    await broker.agents.upsert("a1")
    task = await make_task(broker, max_retries=3)
    now = T0
    expected_backoff = [1.0, 2.0, 4.0]  # seconds, before jitter
    for attempt, base in enumerate(expected_backoff, start=1):
        claimed = await broker.claim("a1", now=now)
        assert claimed is not None and claimed.task_id == task.task_id
        failed = await broker.apply(
            Fail(task_id=task.task_id, agent_id="a1", error=f"boom {attempt}"), now=now
        )
        assert failed.status is TaskStatus.PENDING
        assert failed.retry_count == attempt
        assert failed.assigned_agent is None and failed.previous_agents == ["a1"]
        delay = (failed.available_at - now).total_seconds()
        assert base * 0.8 <= delay <= base * 1.2, (attempt, delay)
        # Not claimable before the backoff has passed.
        assert await broker.claim("a1", now=failed.available_at - timedelta(milliseconds=1)) is None
        now = failed.available_at
    await broker.claim("a1", now=now)
    dead = await broker.apply(Fail(task_id=task.task_id, agent_id="a1", error="final"), now=now)
    assert dead.status is TaskStatus.FAILED and dead.error == "final"
    events = await broker.tasks.events(task.task_id)
    names = [e.event for e in events]
    assert names.count("retry") == 3 and names[-2:] == ["failed", "dlq"]
    assert events[-1].payload == {"reason": "retries exhausted", "retry_count": 3, "max_retries": 3}
    assert (await broker.agents.get("a1")).active_tasks == 0


async def test_backoff_is_capped(broker: Broker) -> None:
    await broker.agents.upsert("a1")
    task = await make_task(broker, max_retries=10)
    now = T0
    for _ in range(5):
        await broker.claim("a1", now=now)
        failed = await broker.apply(Fail(task_id=task.task_id, agent_id="a1", error="x"), now=now)
        now = failed.available_at
    # 1000 * 2^4 = 16000 ms, capped at 5000 ms (+-20 %).
    await broker.claim("a1", now=now)
    failed = await broker.apply(Fail(task_id=task.task_id, agent_id="a1", error="x"), now=now)
    assert (failed.available_at - now).total_seconds() <= 6.0


async def test_not_retry_eligible_goes_straight_to_dead_letter(broker: Broker) -> None:
    task = await make_running(broker, max_retries=5)
    dead = await broker.apply(
        Fail(task_id=task.task_id, agent_id="agent-1", error="bad input", retry_eligible=False)
    )
    assert dead.status is TaskStatus.FAILED and dead.retry_count == 0
    events = await broker.tasks.events(task.task_id)
    assert events[-2].payload["retry_eligible"] is False
    assert events[-1].event == "dlq" and events[-1].payload["reason"] == "not retry eligible"


async def test_retry_prefers_another_agent(broker: Broker) -> None:
    await broker.agents.upsert("a1")
    await broker.agents.upsert("a2")
    task = await make_task(broker)
    [first] = await broker.assign(now=T0)
    failed = await broker.apply(
        Fail(task_id=task.task_id, agent_id=first.agent_id, error="x"), now=T0
    )
    [second] = await broker.assign(now=failed.available_at)
    assert second.agent_id != first.agent_id
    # With nobody else, the previous agent gets it again rather than nobody.
    failed = await broker.apply(
        Fail(task_id=task.task_id, agent_id=second.agent_id, error="x"), now=failed.available_at
    )
    await broker.agents.drain(first.agent_id)
    [third] = await broker.assign(now=failed.available_at)
    assert third.agent_id == second.agent_id


async def test_deadline_timeout_retries_then_times_out(broker: Broker) -> None:
    task = await make_running(broker, timeout_seconds=60, max_retries=1)
    assert await broker.expire(now=at(59)) == []
    [expired] = await broker.expire(now=at(60))
    assert (expired.task_id, expired.event, expired.status) == (
        task.task_id,
        "timeout",
        TaskStatus.PENDING,
    )
    t = await broker.tasks.get(task.task_id)
    assert t.retry_count == 1 and t.previous_agents == ["agent-1"]
    claimed = await broker.claim("agent-1", now=t.available_at)
    assert claimed is not None
    [expired] = await broker.expire(now=t.available_at + timedelta(seconds=60))
    assert expired.status is TaskStatus.TIMED_OUT
    names = await event_names(broker, task)
    assert names[-2:] == ["timeout", "dlq"]
    events = await broker.tasks.events(task.task_id)
    timeouts = [e for e in events if e.event == "timeout"]
    assert timeouts[0].payload["timed_out_in_state"] == "running"
    assert timeouts[1].payload["timed_out_in_state"] == "assigned"


async def test_a_locked_agent_row_holds_back_no_expiry(broker: Broker, db_url: str) -> None:
    # A psql session holds agent-1's row (an UPDATE left uncommitted): the end of an attempt does
    # not write its agent's row, so the reaper's round expires both agents' tasks without waiting.
    stuck = await make_running(broker, "agent-1", timeout_seconds=60)
    other = await make_running(broker, "agent-2", timeout_seconds=60)
    async with await psycopg.AsyncConnection.connect(db_url) as dba:
        await dba.execute(
            "UPDATE dispatch.agents SET last_seen_at = now() WHERE agent_id = 'agent-1'"
        )
        expired = await broker.expire(now=at(61))
        assert {e.task_id for e in expired} == {stuck.task_id, other.task_id}
        assert {e.event for e in expired} == {"timeout"}
        await dba.rollback()
    assert (await broker.agents.get("agent-1")).active_tasks == 0


async def test_heartbeat_expiry_and_progress_keeps_alive(broker: Broker) -> None:
    task = await make_running(broker, heartbeat_seconds=10, timeout_seconds=3600)
    await broker.apply(Progress(task_id=task.task_id, agent_id="agent-1", percent=5), now=at(8))
    assert await broker.expire(now=at(17)) == []
    [expired] = await broker.expire(now=at(18))
    assert expired.event == "timeout"
    events = await broker.tasks.events(task.task_id)
    timeout = next(e for e in events if e.event == "timeout")
    assert timeout.payload["reason"] == "heartbeat"


async def test_wake_timeout_sends_task_back_and_counts_an_attempt(broker: Broker) -> None:
    await broker.agents.upsert("sleepy", status=AgentStatus.SLEEPING)
    task = await make_task(broker, max_retries=1)
    [a] = await broker.assign(now=T0)
    assert a.agent_id == "sleepy" and a.wake is True
    assert await broker.expire(now=at(29)) == []
    [expired] = await broker.expire(now=at(30))
    assert expired.event == "reassigned" and expired.status is TaskStatus.PENDING
    t = await broker.tasks.get(task.task_id)
    assert t.retry_count == 1 and t.previous_agents == ["sleepy"]
    assert t.available_at == at(30)  # no backoff: another agent may take it now
    events = await broker.tasks.events(task.task_id)
    assert events[-1].payload == {"previous_agent": "sleepy", "reason": "wake_timeout"}
    # Starting in time clears the wake timer.
    [again] = await broker.assign(now=at(31))
    await broker.apply(Start(task_id=task.task_id, agent_id=again.agent_id), now=at(40))
    assert await broker.expire(now=at(100)) == []


async def test_wake_timeout_with_no_retries_left_times_out(broker: Broker) -> None:
    await broker.agents.upsert("sleepy", status=AgentStatus.SLEEPING)
    task = await make_task(broker, max_retries=0)
    await broker.assign(now=T0)
    [expired] = await broker.expire(now=at(30))
    assert expired.status is TaskStatus.TIMED_OUT
    assert (await event_names(broker, task))[-2:] == ["timeout", "dlq"]


async def test_agent_stopped_gives_its_active_tasks_back_uncounted(broker: Broker) -> None:
    """An agent's own shutdown is no failure of its work: the task is pending again with no
    attempt counted, even one with no retries left."""
    running = await make_running(broker, agent="a1", max_retries=0)
    n = await broker.agents.stop("a1", now=at(1))
    assert n == 1
    t = await broker.tasks.get(running.task_id)
    assert t.status is TaskStatus.PENDING and t.retry_count == 0
    assert "a1" in t.previous_agents
    assert (await broker.agents.get("a1")).active_tasks == 0
    [released] = (await broker.tasks.events(running.task_id))[-1:]
    assert released.event == "released"
    assert released.payload["reason"] == "agent_stopped" and released.actor == "a1"


async def test_seconds_until_due_counts_to_the_earliest_deadline(broker: Broker) -> None:
    due = broker.tasks.seconds_until_due
    assert await due(now=T0) is None
    await make_running(broker, timeout_seconds=100)
    assert await due(now=T0) == 100
    await make_task(broker, available_at=at(50))
    assert await due(now=T0) == 50
    # The reaper waits for the deadline, the assigner for the scheduled task.
    assert await due("deadline", now=T0) == 100
    assert await due("available", now=T0) == 50
    assert await due("available", now=at(60)) is None
    # The assigner reads it in its round's own statement, after the round's rows.
    assert await broker.tasks.assign_round(10, now=T0) == ([], 50, False, False)
    _, later, _, _ = await broker.tasks.assign_round(10, now=at(60))
    assert later is None


class TestFencing:
    async def test_other_agent_report_is_forbidden_and_changes_nothing(
        self, broker: Broker
    ) -> None:
        task = await make_running(broker)
        before = await broker.tasks.events(task.task_id)
        for report in (
            broker.apply(Start(task_id=task.task_id, agent_id="intruder")),
            broker.apply(Progress(task_id=task.task_id, agent_id="intruder", percent=50)),
            broker.apply(Complete(task_id=task.task_id, actor="intruder", result={"x": 1})),
            broker.apply(Fail(task_id=task.task_id, agent_id="intruder", error="x")),
        ):
            with pytest.raises(Forbidden):
                await report
        assert await broker.tasks.events(task.task_id) == before
        assert (await broker.tasks.get(task.task_id)).status is TaskStatus.RUNNING

    async def test_stale_agent_after_retry_gets_conflict_with_current_task(
        self, broker: Broker
    ) -> None:
        task = await make_running(broker, agent="old", timeout_seconds=10)
        await broker.expire(now=at(10))
        await broker.agents.upsert("new")
        t = await broker.tasks.get(task.task_id)
        claimed = await broker.claim("new", now=t.available_at)
        assert claimed is not None
        with pytest.raises(Conflict) as exc:
            await broker.apply(Complete(task_id=task.task_id, actor="old", result={"late": True}))
        current = exc.value.task
        assert current is not None and current.assigned_agent == "new"  # type: ignore[attr-defined]
        assert (await broker.tasks.get(task.task_id)).status is TaskStatus.ASSIGNED

    async def test_reports_on_terminal_tasks_conflict(self, broker: Broker) -> None:
        task = await make_running(broker)
        await broker.apply(Cancel(task_id=task.task_id, actor="req", reason="stop"))
        for report in (
            broker.apply(Complete(task_id=task.task_id, actor="agent-1", result={"late": True})),
            broker.apply(Fail(task_id=task.task_id, agent_id="agent-1", error="late")),
            broker.apply(Progress(task_id=task.task_id, agent_id="agent-1", percent=90)),
            broker.apply(Start(task_id=task.task_id, agent_id="agent-1")),
        ):
            with pytest.raises(Conflict) as exc:
                await report
            assert exc.value.task.status is TaskStatus.CANCELLED  # type: ignore[attr-defined]
        t = await broker.tasks.get(task.task_id)
        assert t.result is None and t.status is TaskStatus.CANCELLED
