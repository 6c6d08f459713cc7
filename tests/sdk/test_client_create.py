"""The client's create sends wire.TaskCreate, so every documented field reaches the server."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from dispatch.errors import InvalidInput
from dispatch.models import NewTask
from dispatch.sdk.client import AsyncDispatchClient, DispatchClient, _task_create
from dispatch.wire import TaskCreate, new_task
from tests.serve import ServeProcess


def test_new_task_takes_every_field_from_the_wire_struct() -> None:
    wire_fields = set(TaskCreate.__struct_fields__)
    assert set(NewTask.__struct_fields__) <= wire_fields
    req = TaskCreate(title="t", scope="code", context={"k": 1}, concurrency_key="repo",
                     rate_key="llm", cost=7, priority=3)
    assert new_task(req) == NewTask(title="t", required_capabilities=["code"], metadata={"k": 1},
                                    concurrency_key="repo", rate_key="llm", cost=7, priority=3)


def test_the_body_leaves_out_what_the_server_defaults() -> None:
    assert msgspec.to_builtins(_task_create("t", {})) == {"title": "t"}
    body = msgspec.to_builtins(_task_create("t", {"cost": 3, "rate_key": "llm"}))
    assert body == {"title": "t", "rate_key": "llm", "cost": 3}
    with pytest.raises(TypeError):
        _task_create("t", {"costs": 3})
    with pytest.raises(TypeError):
        _task_create(TaskCreate(title="t"), {"cost": 3})


async def test_the_client_sends_flow_fields_and_the_server_stores_them(sp: ServeProcess) -> None:
    later = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    with DispatchClient(sp.api, "alice") as alice:
        parent = alice.create("parent")
        made = alice.create("by name", concurrency_key="repo-x", rate_key="openai", cost=5,
                            parent_task_id=str(parent.task_id), available_at=later,
                            required_capabilities=("code",), source="ci")
        stored = alice.get(made.task_id)
        assert (stored.concurrency_key, stored.rate_key, stored.cost) == ("repo-x", "openai", 5)
        assert stored.parent_task_id == parent.task_id and stored.available_at == later
        assert stored.required_capabilities == ["code"] and stored.source == "ci"
        plain = alice.get(alice.create("defaults").task_id)
        assert (plain.concurrency_key, plain.rate_key, plain.cost) == (None, None, 1)
        with pytest.raises(InvalidInput) as bad:
            alice.create("too cheap", cost=0)
        assert bad.value.field == "cost"
    async with AsyncDispatchClient(sp.api, "bob") as bob:
        task, created = await bob.create_ex(
            TaskCreate(title="as a struct", concurrency_key="k", rate_key="r", cost=2),
            idempotency_key=str(uuid.uuid4()),
        )
        assert created
        stored = await bob.get(task.task_id)
        assert (stored.concurrency_key, stored.rate_key, stored.cost) == ("k", "r", 2)
