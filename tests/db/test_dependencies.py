"""Dependencies between tasks, enforced in SQL: a dependent is blocked out of the queue until every
task it depends on has completed, becomes pending in the transaction of the last completion, and
is cancelled (or let run) when one ends otherwise; through the broker and from plain SQL."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import pytest

from dispatch.broker import Broker
from dispatch.errors import Conflict, Forbidden, InvalidInput, NotFound
from dispatch.models import (
    Cancel,
    Complete,
    Depend,
    Dependency,
    Fail,
    NewTask,
    Requeue,
    Task,
    TaskStatus,
    Undepend,
)
from tests.factories import at, event_names, make_running, make_task

Sql = psycopg.Connection[dict[str, Any]]


async def dependent(broker: Broker, *deps: Task, run: bool = False, **fields: Any) -> Task:
    edges = [Dependency(task_id=d.task_id, on_failure="run" if run else "cancel") for d in deps]
    return await make_task(broker, title="dependent", depends_on=edges, **fields)


async def done(broker: Broker, task: Task, result: object = None) -> Task:
    """Completed by its requester (a manual resolution: no agent needed)."""
    return await broker.apply(Complete(task_id=task.task_id, actor=task.requester, result=result))


async def status(broker: Broker, task: Task) -> TaskStatus:
    return (await broker.tasks.get(task.task_id)).status


async def test_a_dependent_waits_out_of_the_queue_until_its_last_dependency_completes(
    broker: Broker,
) -> None:
    a, b = await make_task(broker, title="a"), await make_task(broker, title="b")
    d = await dependent(broker, a, b)
    assert d.status is TaskStatus.BLOCKED and d.waiting_on == 2
    assert await event_names(broker, d) == ["created", "blocked"]
    # Nothing hands it out: not a claim, not the assigner (a and b are, being pending).
    await broker.agents.upsert("agent-1", capabilities=[])
    claimed = await broker.claim_many("agent-1", max_tasks=10, now=at(1))
    assert {t.task_id for t in claimed} == {a.task_id, b.task_id}

    await done(broker, a, {"from": "a"})
    d = await broker.tasks.get(d.task_id)
    assert d.status is TaskStatus.BLOCKED and d.waiting_on == 1
    await done(broker, b, {"from": "b"})
    d = await broker.tasks.get(d.task_id)
    assert d.status is TaskStatus.PENDING and d.waiting_on == 0
    events = await broker.tasks.events(d.task_id)
    assert [e.event for e in events] == ["created", "blocked", "unblocked"]
    assert events[-1].payload == {"last_dependency": str(b.task_id)}
    # Its agent reads what the dependencies gave in one call.
    deps = await broker.tasks.dependencies(d)
    assert sorted((x.title, x.task_id, x.status, x.result, x.satisfied)
                  for x in deps.dependencies) == [
        ("a", a.task_id, TaskStatus.COMPLETED, {"from": "a"}, True),
        ("b", b.task_id, TaskStatus.COMPLETED, {"from": "b"}, True),
    ]
    assert (await broker.tasks.dependencies(a)).dependents == [d.task_id]
    claimed = await broker.claim_many("agent-1", max_tasks=10, now=at(2))
    assert [t.task_id for t in claimed] == [d.task_id]


async def test_a_dependency_already_completed_lets_the_new_task_run_at_once(
    broker: Broker,
) -> None:
    a = await done(broker, await make_task(broker))
    d = await dependent(broker, a)
    assert d.status is TaskStatus.PENDING and d.waiting_on == 0
    assert await event_names(broker, d) == ["created"]


async def test_a_dependency_failing_for_good_cancels_the_chain_behind_it(broker: Broker) -> None:
    a = await make_running(broker, max_retries=0, title="a")
    b = await dependent(broker, a)
    c = await dependent(broker, b)
    side = await dependent(broker, a, run=True)  # lets its dependent run whatever a's end
    await broker.apply(Fail(task_id=a.task_id, agent_id="agent-1", error="boom"))
    assert await status(broker, a) is TaskStatus.FAILED
    b, c = await broker.tasks.get(b.task_id), await broker.tasks.get(c.task_id)
    assert b.status is c.status is TaskStatus.CANCELLED
    assert b.error == f"dependency {a.task_id} failed"
    assert c.error == f"dependency {b.task_id} cancelled"
    [cancelled] = [e for e in await broker.tasks.events(c.task_id) if e.event == "cancelled"]
    assert cancelled.actor == "dispatch" and cancelled.payload["dependency"] == str(b.task_id)
    assert await status(broker, side) is TaskStatus.PENDING


async def test_a_failure_with_retries_left_keeps_dependents_waiting(broker: Broker) -> None:
    a = await make_running(broker, max_retries=2)
    d = await dependent(broker, a)
    await broker.apply(Fail(task_id=a.task_id, agent_id="agent-1", error="try again"))
    assert await status(broker, a) is TaskStatus.PENDING
    assert await status(broker, d) is TaskStatus.BLOCKED


async def test_a_long_chain_cancels_without_exhausting_the_stack(broker: Broker) -> None:
    first = await make_task(broker, title="link 0")
    prev = first
    for _ in range(300):
        prev = await dependent(broker, prev)
    await broker.apply(Cancel(task_id=first.task_id, actor="req"))
    last = await broker.tasks.get(prev.task_id)
    assert last.status is TaskStatus.CANCELLED and last.error is not None


async def test_bad_dependencies_are_refused_and_write_nothing(broker: Broker, sql: Sql) -> None:
    mine = await make_task(broker, requester="alice")
    theirs = await make_task(broker, requester="bob")
    before = sql.execute("SELECT count(*) AS n FROM dispatch.tasks").fetchone()
    cases: list[list[Dependency]] = [
        [Dependency(task_id=uuid.uuid4())],  # no such task
        [Dependency(task_id=mine.task_id), Dependency(task_id=mine.task_id)],  # twice
    ]
    for edges in cases:
        with pytest.raises(InvalidInput) as info:
            await broker.submit(NewTask(title="x", depends_on=edges), requester="alice",
                                viewer="alice")
        assert info.value.field == "depends_on"
    # A task alice may not see answers as one that does not exist.
    with pytest.raises(InvalidInput, match="do not exist"):
        await broker.submit(NewTask(title="x", depends_on=[Dependency(task_id=theirs.task_id)]),
                            requester="alice", viewer="alice")
    after = sql.execute("SELECT count(*) AS n FROM dispatch.tasks").fetchone()
    assert before == after
    assert sql.execute("SELECT count(*) AS n FROM dispatch.task_dependencies").fetchone() == {
        "n": 0}
    # psql: malformed JSON shapes are a clear error.
    for bad in ('{"a": 1}', '[42]', '["not-a-uuid"]',
                f'[{{"task_id": "{mine.task_id}", "on_failure": "x"}}]',
                f'[{{"task_id": "{mine.task_id}", "extra": 1}}]'):
        with pytest.raises(psycopg.Error) as err:
            sql.execute("SELECT dispatch.create_task('x', depends_on => %s::jsonb)", (bad,))
        assert err.value.sqlstate == "UD400", bad


async def test_edges_change_while_the_task_waits(broker: Broker) -> None:
    a, b = await make_task(broker, title="a"), await make_task(broker, title="b")
    d = await make_task(broker, title="d")
    t = await broker.apply(Depend(task_id=d.task_id, depends_on=a.task_id, actor="req"))
    assert t.status is TaskStatus.BLOCKED and t.waiting_on == 1
    t = await broker.apply(Depend(task_id=d.task_id, depends_on=b.task_id, actor="req"))
    assert t.waiting_on == 2
    # Again with another on_failure: the same edge, changed.
    t = await broker.apply(Depend(task_id=d.task_id, depends_on=b.task_id, actor="req",
                                  on_failure="run"))
    assert t.waiting_on == 2
    # A cycle, itself, someone else, an edge that is not there.
    with pytest.raises(InvalidInput, match="cycle"):
        await broker.apply(Depend(task_id=a.task_id, depends_on=d.task_id, actor="req"))
    with pytest.raises(InvalidInput):
        await broker.apply(Depend(task_id=d.task_id, depends_on=d.task_id, actor="req"))
    with pytest.raises(Forbidden):
        await broker.apply(Depend(task_id=d.task_id, depends_on=a.task_id, actor="mallory"))
    with pytest.raises(NotFound):
        await broker.apply(Undepend(task_id=d.task_id, depends_on=uuid.uuid4(), actor="req"))
    t = await broker.apply(Undepend(task_id=d.task_id, depends_on=a.task_id, actor="req"))
    assert t.status is TaskStatus.BLOCKED and t.waiting_on == 1
    t = await broker.apply(Undepend(task_id=d.task_id, depends_on=b.task_id, actor="req"))
    assert t.status is TaskStatus.PENDING and t.waiting_on == 0
    assert await event_names(broker, t) == [
        "created", "blocked", "dependency_added", "dependency_added", "dependency_added",
        "dependency_removed", "dependency_removed", "unblocked",
    ]
    # Once it runs, its edges are settled.
    running = await make_running(broker, agent="agent-9", title="r", priority=10)
    with pytest.raises(Conflict):
        await broker.apply(Depend(task_id=running.task_id, depends_on=a.task_id, actor="req"))
    # A dependency that already failed would cancel it: refused, unless its edge runs anyway.
    gone = await broker.apply(Cancel(task_id=a.task_id, actor="req"))
    with pytest.raises(Conflict, match="would cancel"):
        await broker.apply(Depend(task_id=d.task_id, depends_on=gone.task_id, actor="req"))
    t = await broker.apply(Depend(task_id=d.task_id, depends_on=gone.task_id, actor="req",
                                  on_failure="run"))
    assert t.status is TaskStatus.PENDING


async def test_requeue_brings_a_cancelled_dependent_back_behind_its_dependency(
    broker: Broker,
) -> None:
    a = await make_running(broker, max_retries=0)
    d = await dependent(broker, a)
    await broker.apply(Fail(task_id=a.task_id, agent_id="agent-1", error="boom"))
    assert await status(broker, d) is TaskStatus.CANCELLED
    with pytest.raises(Conflict, match="requeue that one first"):
        await broker.apply(Requeue(task_id=d.task_id, actor="admin"))
    await broker.apply(Requeue(task_id=a.task_id, actor="admin"))
    d = await broker.apply(Requeue(task_id=d.task_id, actor="admin"))
    assert d.status is TaskStatus.BLOCKED and d.waiting_on == 1
    await done(broker, a)
    assert await status(broker, d) is TaskStatus.PENDING


async def test_a_blocked_task_may_be_cancelled_or_resolved_by_hand(broker: Broker) -> None:
    a = await make_task(broker)
    d1, d2 = await dependent(broker, a), await dependent(broker, a)
    assert (await broker.apply(Cancel(task_id=d1.task_id, actor="req"))).status is \
        TaskStatus.CANCELLED
    assert (await done(broker, d2)).status is TaskStatus.COMPLETED
    await done(broker, a)  # its end finds them ended: nothing changes
    assert await status(broker, d1) is TaskStatus.CANCELLED


async def test_plain_sql_completion_unblocks_dependents(broker: Broker, sql: Sql) -> None:
    a = await make_task(broker)
    d = await dependent(broker, a)
    sql.execute("UPDATE dispatch.tasks SET status = 'completed' WHERE task_id = %s", (a.task_id,))
    assert await status(broker, d) is TaskStatus.PENDING
    assert await event_names(broker, d) == ["created", "blocked", "unblocked"]
    # And the guard keeps a blocked task out of the lifecycle's other edges.
    e = await dependent(broker, await make_task(broker))
    with pytest.raises(psycopg.Error) as err:
        sql.execute("UPDATE dispatch.tasks SET status = 'assigned', assigned_agent = 'x'"
                    " WHERE task_id = %s", (e.task_id,))
    assert err.value.sqlstate == "UD409"


async def test_concurrent_completions_of_a_fan_in_unblock_it_once(broker: Broker) -> None:
    deps = [await make_task(broker, title=f"part {i}") for i in range(24)]
    join = await dependent(broker, *deps)
    await asyncio.gather(*(done(broker, t) for t in deps))
    join = await broker.tasks.get(join.task_id)
    assert join.status is TaskStatus.PENDING and join.waiting_on == 0
    assert (await event_names(broker, join)).count("unblocked") == 1
