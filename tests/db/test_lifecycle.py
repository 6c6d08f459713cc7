"""Every legal transition through the broker, each with its event row."""

from __future__ import annotations

import pytest

from dispatch.broker import Broker
from dispatch.errors import Conflict, Forbidden, InvalidInput, NotFound
from dispatch.models import (
    Cancel,
    Complete,
    Fail,
    NewTask,
    Progress,
    Requeue,
    Start,
    TaskStatus,
    Update,
)
from tests.factories import T0, at, event_names, make_running, make_task


async def test_create_normalises_and_writes_created_event(broker: Broker) -> None:
    task, created = await broker.submit(
        NewTask(title="t", required_capabilities=[" Code ", "code", "REVIEW", ""], priority=7),
        requester="alice",
    )
    assert created
    assert task.status is TaskStatus.PENDING
    assert task.required_capabilities == ["code", "review"]
    assert task.owner is None and task.requester == "alice" and task.source == "api"
    assert task.timeout_seconds == 300
    events = await broker.tasks.events(task.task_id)
    assert [(e.event, e.actor) for e in events] == [("created", "alice")]
    assert events[0].payload["priority"] == 7


async def test_idempotency_key_returns_the_same_task(broker: Broker) -> None:
    first, created1 = await broker.submit(NewTask(title="t"), requester="r", idempotency_key="k1")
    again, created2 = await broker.submit(
        NewTask(title="other"), requester="r", idempotency_key="k1"
    )
    other_requester, created3 = await broker.submit(
        NewTask(title="t"), requester="s", idempotency_key="k1"
    )
    assert (created1, created2, created3) == (True, False, True)
    assert again.task_id == first.task_id and again.title == "t"
    assert other_requester.task_id != first.task_id


async def test_full_lifecycle_events_in_order(broker: Broker) -> None:
    await broker.agents.upsert("a1", capabilities=["code"])
    task = await make_task(broker, required_capabilities=["code"])
    [assignment] = await broker.assign(now=at(1))
    assert assignment.task_id == task.task_id and assignment.agent_id == "a1"
    assigned = await broker.tasks.get(task.task_id)
    assert assigned.status is TaskStatus.ASSIGNED and assigned.assigned_agent == "a1"
    assert assigned.deadline_at == at(1 + 300)
    running = await broker.apply(Start(task_id=task.task_id, agent_id="a1"), now=at(2))
    assert running.status is TaskStatus.RUNNING and running.started_at == at(2)
    progressed = await broker.apply(
        Progress(task_id=task.task_id, agent_id="a1", percent=40, message="m"), now=at(3)
    )
    assert progressed.progress == {"percent": 40.0, "message": "m"}
    done = await broker.apply(
        Complete(task_id=task.task_id, actor="a1", result={"answer": 42}), now=at(4)
    )
    assert done.status is TaskStatus.COMPLETED and done.result == {"answer": 42}
    assert done.completed_at == at(4)
    events = await broker.tasks.events(task.task_id)
    assert [e.event for e in events] == ["created", "assigned", "started", "progress", "completed"]
    assert events[1].payload["assigned_agent"] == "a1" and events[1].payload["attempt"] == 1
    assert events[4].payload == {"assigned_agent": "a1", "result": {"answer": 42}}
    agent = await broker.agents.get("a1")
    assert agent.active_tasks == 0


async def test_first_progress_starts_an_assigned_task(broker: Broker) -> None:
    await broker.agents.upsert("a1")
    task = await make_task(broker)
    await broker.claim("a1", now=T0)
    t = await broker.apply(Progress(task_id=task.task_id, agent_id="a1", percent=10), now=at(1))
    assert t.status is TaskStatus.RUNNING and t.started_at == at(1)
    assert await event_names(broker, task) == ["created", "assigned", "started", "progress"]


async def test_complete_straight_from_assigned(broker: Broker) -> None:
    await broker.agents.upsert("a1")
    task = await make_task(broker)
    await broker.claim("a1", now=T0)
    done = await broker.apply(Complete(task_id=task.task_id, actor="a1", result=None), now=at(1))
    assert done.status is TaskStatus.COMPLETED


async def test_repeated_complete_by_same_agent_is_unchanged(broker: Broker) -> None:
    task = await make_running(broker)
    first = await broker.apply(
        Complete(task_id=task.task_id, actor="agent-1", result={"v": 1}), now=at(5)
    )
    again = await broker.apply(
        Complete(task_id=task.task_id, actor="agent-1", result={"v": 2}), now=at(6)
    )
    assert again == first
    assert (await event_names(broker, task)).count("completed") == 1


async def test_manual_resolution_by_requester_owner_or_admin(broker: Broker) -> None:
    await broker.agents.upsert("agent-1", owner="boss")
    for actor, admin in (("req", False), ("boss", False), ("root", True)):
        task = await make_running(broker, owner="boss")
        done = await broker.apply(
            Complete(task_id=task.task_id, actor=actor, result={"by": actor}, admin=admin)
        )
        assert done.status is TaskStatus.COMPLETED
        events = await broker.tasks.events(task.task_id)
        assert events[-1].actor == actor and events[-1].payload["manual"] is True


async def test_manual_resolution_of_a_pending_task(broker: Broker) -> None:
    """The original service's smoke flow: create, then complete as the requester while pending."""
    for actor, admin in (("req", False), ("boss", False), ("root", True)):
        task = await make_task(broker, owner="boss")
        done = await broker.apply(
            Complete(task_id=task.task_id, actor=actor, result={"answer": 42}, admin=admin)
        )
        assert done.status is TaskStatus.COMPLETED and done.result == {"answer": 42}
        assert done.assigned_agent is None and done.completed_at is not None
        last = (await broker.tasks.events(task.task_id))[-1]
        assert (last.event, last.actor) == ("completed", actor)
        assert last.payload == {"assigned_agent": None, "result": {"answer": 42}, "manual": True}


async def test_nobody_else_completes_a_pending_task(broker: Broker) -> None:
    await broker.agents.upsert("agent-1")
    task = await make_task(broker)  # no owner: only its requester (or an admin) resolves it
    for actor in ("agent-1", "mallory"):
        with pytest.raises(Forbidden):
            await broker.apply(Complete(task_id=task.task_id, actor=actor, result={"x": 1}))
    assert (await broker.tasks.get(task.task_id)).status is TaskStatus.PENDING
    assert await event_names(broker, task) == ["created"]


async def test_an_agent_completing_its_own_task_is_not_manual(broker: Broker) -> None:
    task = await make_running(broker)
    await broker.apply(Complete(task_id=task.task_id, actor="agent-1", result={"ok": True}))
    last = (await broker.tasks.events(task.task_id))[-1]
    assert "manual" not in last.payload


async def test_cancel_pending_assigned_running(broker: Broker) -> None:
    await broker.agents.upsert("a1", max_concurrent=5)
    pending = await make_task(broker)
    cancelled = await broker.apply(
        Cancel(task_id=pending.task_id, actor="req", reason="not needed")
    )
    assert cancelled.status is TaskStatus.CANCELLED
    assigned = await make_task(broker)
    await broker.claim("a1", now=T0)
    cancelled = await broker.apply(Cancel(task_id=assigned.task_id, actor="req"))
    assert cancelled.status is TaskStatus.CANCELLED
    running = await make_running(broker, agent="a1")
    cancelled = await broker.apply(Cancel(task_id=running.task_id, actor="x", admin=True))
    assert cancelled.status is TaskStatus.CANCELLED
    events = await broker.tasks.events(pending.task_id)
    assert events[-1].event == "cancelled" and events[-1].payload["reason"] == "not needed"
    assert (await broker.agents.get("a1")).active_tasks == 0


async def test_cancel_by_someone_else_is_forbidden(broker: Broker) -> None:
    task = await make_task(broker)
    with pytest.raises(Forbidden):
        await broker.apply(Cancel(task_id=task.task_id, actor="mallory"))
    assert (await broker.tasks.get(task.task_id)).status is TaskStatus.PENDING


async def test_requeue_dead_letters(broker: Broker) -> None:
    task = await make_running(broker, max_retries=0)
    failed = await broker.apply(
        Fail(task_id=task.task_id, agent_id="agent-1", error="boom"), now=at(1)
    )
    assert failed.status is TaskStatus.FAILED
    again = await broker.apply(Requeue(task_id=failed.task_id, actor="admin"), now=at(2))
    assert again.status is TaskStatus.PENDING and again.retry_count == 0
    assert again.assigned_agent is None and again.completed_at is None
    assert (await event_names(broker, task))[-1] == "requeued"
    done = await make_running(broker, agent="agent-2")
    await broker.apply(Complete(task_id=done.task_id, actor="agent-2"))
    with pytest.raises(Conflict) as exc:
        await broker.apply(Requeue(task_id=done.task_id, actor="admin"))
    assert exc.value.task is not None


async def test_update_merges_metadata_and_reprioritises_pending(broker: Broker) -> None:
    running = await make_running(broker, agent="a2")
    task = await make_task(broker, metadata={"a": 1, "b": {"c": 2, "d": 3}})
    t = await broker.apply(
        Update(
            task_id=task.task_id,
            actor="req",
            metadata_patch={"b": {"c": None, "e": 4}, "f": 5},
            priority=9,
        ),
    )
    assert t.metadata == {"a": 1, "b": {"d": 3, "e": 4}, "f": 5}
    assert t.priority == 9
    assert (await event_names(broker, task))[-1] == "updated"
    with pytest.raises(Conflict):
        await broker.apply(Update(task_id=running.task_id, actor="req", priority=1))


async def test_unknown_task_is_not_found(broker: Broker) -> None:
    import uuid

    missing = uuid.uuid4()
    with pytest.raises(NotFound):
        await broker.tasks.get(missing)
    with pytest.raises(NotFound):
        await broker.apply(Start(task_id=missing, agent_id="a1"))
    with pytest.raises(NotFound):
        await broker.tasks.events(missing)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"title": ""}, "title"),
        ({"title": "x" * 501}, "title"),
        ({"title": "t", "priority": 11}, "priority"),
        ({"title": "t", "priority": -1}, "priority"),
        ({"title": "t", "max_retries": 101}, "max_retries"),
        ({"title": "t", "timeout_seconds": 0}, "timeout_seconds"),
        ({"title": "t", "heartbeat_seconds": -5}, "heartbeat_seconds"),
        ({"title": "t", "description": "x" * 70000}, "description"),
    ],
)
async def test_bad_task_arguments_are_refused_and_nothing_is_written(
    broker: Broker, sql: object, fields: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidInput) as exc:
        await broker.submit(NewTask(**fields), requester="r")  # type: ignore[arg-type]
    assert exc.value.field == field
    counts = sql.execute(  # type: ignore[attr-defined]
        "SELECT (SELECT count(*) FROM dispatch.tasks) AS t,"
        " (SELECT count(*) FROM dispatch.task_events) AS e"
    ).fetchone()
    assert counts == {"t": 0, "e": 0}


async def test_unknown_parent_is_invalid(broker: Broker) -> None:
    import uuid

    with pytest.raises(InvalidInput) as exc:
        await broker.submit(NewTask(title="t", parent_task_id=uuid.uuid4()), requester="r")
    assert exc.value.field == "parent_task_id"


async def test_progress_percent_out_of_range(broker: Broker) -> None:
    task = await make_running(broker)
    with pytest.raises(InvalidInput) as exc:
        await broker.apply(Progress(task_id=task.task_id, agent_id="agent-1", percent=101))
    assert exc.value.field == "percent"
    assert await event_names(broker, task) == ["created", "assigned", "started"]


async def test_deep_merge_patch_merges_every_level(broker: Broker) -> None:
    def nested(depth: int, leaf: object) -> dict[str, object]:
        value: object = leaf
        for i in reversed(range(depth)):
            value = {f"k{i}": value, f"keep{i}": i}
        assert isinstance(value, dict)
        return value

    task = await make_task(broker, metadata=nested(30, "old"))
    patch: object = {"new": True}
    for i in reversed(range(30)):
        patch = {f"k{i}": patch}
    t = await broker.apply(Update(task_id=task.task_id, actor="req", metadata_patch=patch))  # type: ignore[arg-type]
    node: object = t.metadata
    for i in range(30):
        assert isinstance(node, dict) and node[f"keep{i}"] == i
        node = node[f"k{i}"]
    assert node == {"new": True}


async def test_nul_character_is_invalid_input(broker: Broker) -> None:
    with pytest.raises(InvalidInput):
        await broker.submit(NewTask(title="bad\x00title"), requester="r")
