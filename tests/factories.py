"""Rows with constraint-consistent defaults, made through the same paths users take."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from dispatch.broker import Broker
from dispatch.models import NewTask, Start, Task

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    """An instant `seconds` after T0: the injected clock of the tests."""
    return T0 + timedelta(seconds=seconds)


async def make_task(broker: Broker, requester: str = "req", **fields: Any) -> Task:
    fields.setdefault("title", "a task")
    fields.setdefault("available_at", T0)
    task, _ = await broker.submit(NewTask(**fields), requester=requester)
    return task


async def make_running(
    broker: Broker, agent: str = "agent-1", now: datetime = T0, **fields: Any
) -> Task:
    """A task claimed and started by `agent` at `now`."""
    await broker.agents.upsert(agent, capabilities=fields.get("required_capabilities", []))
    task = await make_task(broker, **fields)
    claimed = await broker.claim(agent, now=now)
    assert claimed is not None and claimed.task_id == task.task_id
    return await broker.apply(Start(task_id=task.task_id, agent_id=agent), now=now)


async def event_names(broker: Broker, task: Task) -> list[str]:
    return [e.event for e in await broker.tasks.events(task.task_id)]
