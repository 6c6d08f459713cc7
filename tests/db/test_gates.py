"""Gates, enforced in SQL: approval before a task may run (approve, reject) and review of its
result before it completes (accept, request changes), with dependencies counted alongside."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from dispatch.broker import Broker
from dispatch.errors import Conflict, Forbidden, InvalidInput
from dispatch.metrics import Metrics
from dispatch.models import (
    Accept,
    Approve,
    Complete,
    Dependency,
    Reject,
    RequestChanges,
    Requeue,
    Start,
    TaskStatus,
)
from tests.factories import at, event_names, make_running, make_task

Sql = psycopg.Connection[dict[str, Any]]


async def test_before_start_waits_for_approval_then_runs(broker: Broker) -> None:
    t = await make_task(broker, approval="before_start")
    assert t.status is TaskStatus.BLOCKED and t.waiting_on == 1
    await broker.agents.upsert("agent-1", capabilities=[])
    assert await broker.claim("agent-1", now=at(1)) is None
    with pytest.raises(Forbidden):
        await broker.apply(Approve(task_id=t.task_id, actor="mallory"))
    with pytest.raises(Conflict):  # only one that waits for approval can be accepted
        await broker.apply(Accept(task_id=t.task_id, actor="req"))
    t = await broker.apply(Approve(task_id=t.task_id, actor="req"))
    assert t.status is TaskStatus.PENDING and t.approved_by == "req"
    assert await event_names(broker, t) == ["created", "blocked", "approved", "unblocked"]
    with pytest.raises(Conflict):  # approved once
        await broker.apply(Approve(task_id=t.task_id, actor="req"))
    plain = await make_task(broker)
    for decision in (Approve(task_id=plain.task_id, actor="req"),
                     Reject(task_id=plain.task_id, actor="req"),
                     Accept(task_id=plain.task_id, actor="req")):
        with pytest.raises(Conflict):
            await broker.apply(decision)
    claimed = await broker.claim("agent-1", now=at(2))
    assert claimed is not None and claimed.task_id == t.task_id


async def test_approval_and_dependencies_both_hold_a_task(broker: Broker) -> None:
    dep = await make_task(broker, title="first")
    t = await make_task(broker, approval="both", depends_on=[Dependency(task_id=dep.task_id)])
    assert t.status is TaskStatus.BLOCKED and t.waiting_on == 2
    t = await broker.apply(Approve(task_id=t.task_id, actor="req", admin=True))
    assert t.status is TaskStatus.BLOCKED and t.waiting_on == 1
    held = await broker.tasks.hold(t.task_id)
    assert [r.split(":")[0] for r in held["reasons"]] == [
        "waiting for 1 of its dependencies to complete"]
    await broker.apply(Complete(task_id=dep.task_id, actor="req"))
    assert (await broker.tasks.get(t.task_id)).status is TaskStatus.PENDING


async def test_reject_cancels_with_the_reason_and_requeue_asks_again(broker: Broker) -> None:
    t = await make_task(broker, approval="before_start")
    dependent = await make_task(broker, depends_on=[Dependency(task_id=t.task_id)])
    t = await broker.apply(Reject(task_id=t.task_id, actor="req", reason="not this week"))
    assert t.status is TaskStatus.CANCELLED and t.error == "rejected by req: not this week"
    assert (await broker.tasks.get(dependent.task_id)).status is TaskStatus.CANCELLED
    t = await broker.apply(Requeue(task_id=t.task_id, actor="admin"))
    assert t.status is TaskStatus.BLOCKED and t.waiting_on == 1


async def test_review_keeps_the_result_until_accepted(broker: Broker, sql: Sql) -> None:
    t = await make_running(broker, approval="review")
    dependent = await make_task(broker, depends_on=[Dependency(task_id=t.task_id)])
    t = await broker.apply(Complete(task_id=t.task_id, actor="agent-1", result={"draft": 1}))
    assert t.status is TaskStatus.REVIEW and t.result == {"draft": 1} and t.completed_at is None
    # The agent's slot is free; its repeated report changes nothing; dependents still wait.
    assert sql.execute("SELECT dispatch.agent_active('agent-1') AS n").fetchone() == {"n": 0}
    again = await broker.apply(Complete(task_id=t.task_id, actor="agent-1", result={"x": 2}))
    assert again.status is TaskStatus.REVIEW and again.result == {"draft": 1}
    assert (await broker.tasks.get(dependent.task_id)).status is TaskStatus.BLOCKED
    held = await broker.tasks.hold(t.task_id)
    assert held["reasons"][0].startswith("its result waits for review")
    t = await broker.apply(Accept(task_id=t.task_id, actor="req"))
    assert t.status is TaskStatus.COMPLETED and t.result == {"draft": 1}
    assert (await event_names(broker, t))[-3:] == ["in_review", "accepted", "completed"]
    assert (await broker.tasks.get(dependent.task_id)).status is TaskStatus.PENDING


async def test_request_changes_is_another_attempt_with_the_feedback(broker: Broker) -> None:
    t = await make_running(broker, approval="review", max_retries=1)
    await broker.apply(Complete(task_id=t.task_id, actor="agent-1", result="v1"))
    with pytest.raises(InvalidInput):
        await broker.apply(RequestChanges(task_id=t.task_id, actor="req", feedback=" "))
    t = await broker.apply(RequestChanges(task_id=t.task_id, actor="req",
                                          feedback="cite your sources"))
    assert t.status is TaskStatus.PENDING and t.retry_count == 1
    assert t.feedback == "cite your sources" and t.previous_agents == ["agent-1"]
    # The next attempt sees the feedback; a second request with no retries left fails it.
    await broker.agents.upsert("agent-2", capabilities=[])
    again = await broker.claim("agent-2", now=at(3600))
    assert again is not None and again.task_id == t.task_id and again.feedback == t.feedback
    await broker.apply(Start(task_id=t.task_id, agent_id="agent-2"), now=at(3600))
    await broker.apply(Complete(task_id=t.task_id, actor="agent-2", result="v2"))
    t = await broker.apply(RequestChanges(task_id=t.task_id, actor="req", feedback="still no"))
    assert t.status is TaskStatus.FAILED and t.error == "changes requested: still no"


async def test_bad_approval_values_are_refused(sql: Sql) -> None:
    with pytest.raises(psycopg.Error) as err:
        sql.execute("SELECT dispatch.create_task('x', approval => 'sometimes')")
    assert err.value.sqlstate == "UD400"
    row = sql.execute("SELECT status::text, waiting_on FROM dispatch.create_task('y',"
                      " approval => 'before_start')").fetchone()
    assert row == {"status": "blocked", "waiting_on": 1}


async def test_gate_decisions_are_counted_as_the_transitions_they_are(broker: Broker) -> None:
    broker.metrics = metrics = Metrics()

    def counted(event: str) -> float:
        value = metrics.registry.get_sample_value(
            "dispatch_task_transitions_total", {"event": event}
        )
        return value or 0.0

    t = await make_running(broker, approval="review")
    await broker.apply(Complete(task_id=t.task_id, actor="agent-1", result="draft"))
    assert (counted("in_review"), counted("completed")) == (1, 0)
    await broker.apply(Accept(task_id=t.task_id, actor="req"))
    assert (counted("accepted"), counted("completed")) == (1, 1)
    t = await make_running(broker, agent="agent-2", approval="review", max_retries=0)
    await broker.apply(Complete(task_id=t.task_id, actor="agent-2", result="draft"))
    await broker.apply(RequestChanges(task_id=t.task_id, actor="req", feedback="no"))
    assert (counted("changes_requested"), counted("dlq")) == (1, 1)
    gated = await make_task(broker, approval="before_start")
    await broker.apply(Approve(task_id=gated.task_id, actor="req"))
    assert (counted("approved"), counted("unblocked")) == (1, 1)
