from __future__ import annotations

from dispatch.broker import Broker
from dispatch.models import NewTask, TaskStatus


async def test_submit_assign_complete(broker: Broker) -> None:
    await broker.agent_register("a1", capabilities=["code"])
    task, created = await broker.submit(NewTask(title="t", required_capabilities=["Code"]), requester="r")
    assert created and task.status is TaskStatus.PENDING
    assignments = await broker.assign()
    assert [a.agent_id for a in assignments] == ["a1"]
    done = await broker.complete(task.task_id, "a1", {"ok": True})
    assert done.status is TaskStatus.COMPLETED
