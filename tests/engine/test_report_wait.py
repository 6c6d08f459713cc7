"""A completion whose `next` waits: the wait is armed before the report's statement, so work
committed after that statement's snapshot wakes it, and the statement's empty claim is not run
again before the wait."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from dispatch.broker import Broker, NextClaim
from dispatch.engine.assigner import Assigner
from dispatch.models import Complete, NewTask, TaskStatus
from dispatch.notify import Listener
from dispatch.settings import AssignmentSettings
from dispatch.store import Store

SLOW_TICK_MS = 60_000  # nothing here may come from the assigner's fallback tick
WAIT = 20.0  # far longer than any of these tests runs: a missed wake-up fails them


@pytest.fixture
async def listened(
    pool: AsyncConnectionPool[Any], listener: Listener, assignment_settings: AssignmentSettings
) -> Broker:
    b = Broker(Store(pool), listener=listener, assignment=assignment_settings)
    await b.apply_config()
    return b


async def running(broker: Broker, agent: str) -> Any:
    task, _ = await broker.submit(NewTask(title="first"), requester="req")
    [got] = await broker.claim_many(agent, start=True)
    assert got.task_id == task.task_id
    return got


class Claims:
    """Counts the claim statements the broker runs on their own (not inside a report's)."""

    def __init__(self, broker: Broker) -> None:
        self.claims = 0
        claim = broker.tasks.claim

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.claims += 1
            return await claim(*args, **kwargs)

        broker.tasks.claim = counted  # type: ignore[method-assign]


class Spy(Claims):
    """Counts the claims, and once the report's statement has run (found nothing, committed),
    submits a task from elsewhere and waits until this process has heard of it (`channel`),
    before the broker may begin its wait."""

    def __init__(self, broker: Broker, listener: Listener, channel: str) -> None:
        super().__init__(broker)
        self.late: uuid.UUID | None = None
        report = broker.tasks.apply_then_claim

        async def then_late_work(*args: Any, **kwargs: Any) -> Any:
            answer = await report(*args, **kwargs)
            assert answer[1] == []  # the report's own claim found nothing
            heard = listener.event(channel)
            task, _ = await broker.submit(NewTask(title="late"), requester="req")
            self.late = task.task_id
            await asyncio.wait_for(heard.wait(), 10)
            return answer

        broker.tasks.apply_then_claim = then_late_work  # type: ignore[method-assign]


async def test_work_committed_after_the_reports_statement_wakes_its_wait(
    listened: Broker, listener: Listener
) -> None:
    """No assigner here: new work (dispatch_work) wakes the wait."""
    await listened.agents.upsert("bob", max_concurrent=1)
    first = await running(listened, "bob")
    spy = Spy(listened, listener, "dispatch_work")
    done, following = await listened.apply_then_claim(
        Complete(task_id=first.task_id, actor="bob", lease=first.lease),
        "bob", NextClaim(start=True, wait_seconds=WAIT),
    )
    assert done.status == TaskStatus.COMPLETED
    assert [(t.task_id, t.status) for t in following] == [(spy.late, TaskStatus.RUNNING)]
    # One claim after the wake-up; none between the report's statement and the wait.
    assert spy.claims == 1


async def test_a_push_after_the_reports_statement_wakes_its_wait(
    listened: Broker, listener: Listener
) -> None:
    """As `serve` runs: the assigner gives the new task to the agent with room, and that push
    (dispatch_assigned) wakes the wait, which then takes the task it was given."""
    await listened.agents.upsert("bob", max_concurrent=1)
    first = await running(listened, "bob")
    assigner = Assigner(listened, listener, tick_interval_ms=SLOW_TICK_MS)
    await assigner.start()
    try:
        listened.pushing = True
        spy = Spy(listened, listener, "dispatch_assigned")
        done, following = await listened.apply_then_claim(
            Complete(task_id=first.task_id, actor="bob", lease=first.lease),
            "bob", NextClaim(start=True, wait_seconds=WAIT),
        )
    finally:
        await assigner.stop()
    assert done.status == TaskStatus.COMPLETED
    assert [(t.task_id, t.status, t.assigned_agent) for t in following] == [
        (spy.late, TaskStatus.RUNNING, "bob")]
    assert spy.claims == 1


async def test_a_batched_report_whose_next_waits_is_woken_the_same_way(
    listened: Broker, listener: Listener
) -> None:
    """As `serve` runs (an assigner pushing): the report's own freed room wakes nothing, the push
    of a later task does, and only then does the agent's claim run again."""
    await listened.agents.upsert("bob", max_concurrent=1)
    first = await running(listened, "bob")
    counter = Claims(listened)
    assigner = Assigner(listened, listener, tick_interval_ms=SLOW_TICK_MS)
    await assigner.start()
    try:
        listened.pushing = True
        waiting = asyncio.ensure_future(listened.report(
            "bob", [{"action": "complete", "task_id": str(first.task_id), "lease": first.lease}],
            then=(0, NextClaim(start=True, wait_seconds=WAIT)),
        ))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # nothing to take: it waits
        assert counter.claims == 0
        task, _ = await listened.submit(NewTask(title="later"), requester="req")
        [outcome] = await asyncio.wait_for(waiting, 10)
    finally:
        await assigner.stop()
    assert outcome.status == 200
    assert [(t.task_id, t.status) for t in outcome.next] == [  # type: ignore[attr-defined]
        (task.task_id, TaskStatus.RUNNING)]
    assert counter.claims == 1
