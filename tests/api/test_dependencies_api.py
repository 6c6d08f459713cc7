"""Dependencies over REST: `depends_on` at create, the dependencies' results in one call, edges
added and removed while the task waits; bad input is a 400 that writes nothing."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import psycopg
import pytest

from tests.api.conftest import admin, agent, counts, register

ALICE = agent("alice")
Sql = psycopg.Connection[dict[str, Any]]


async def create(client: httpx.AsyncClient, title: str, **body: Any) -> Any:
    r = await client.post("/api/v1/tasks", json={"title": title, **body}, headers=ALICE)
    assert r.status_code == 201, r.text
    return r.json()


async def finish(client: httpx.AsyncClient, task: Any, result: Any) -> None:
    """Claimed, started and completed by worker-1 (registered for the task's capability)."""
    claim = {"capabilities": task["required_capabilities"], "start": True}
    r = await client.post("/api/v1/tasks/claim", json=claim, headers=agent("worker-1"))
    assert r.status_code == 200 and r.json()["task_id"] == task["task_id"], r.text
    r = await client.post(f"/api/v1/tasks/{task['task_id']}/complete",
                          json={"result": result}, headers=agent("worker-1"))
    assert r.status_code == 200, r.text


async def test_a_plan_runs_in_dependency_order(client: httpx.AsyncClient) -> None:
    await register(client, "worker-1", capabilities=["fetch", "merge"])
    left = await create(client, "fetch left", required_capabilities=["fetch"])
    right = await create(client, "fetch right", required_capabilities=["fetch"])
    merge = await create(client, "merge", required_capabilities=["merge"], depends_on=[
        left["task_id"], {"task_id": right["task_id"], "on_failure": "cancel"}])
    assert merge["status"] == "blocked" and merge["waiting_on"] == 2
    # The blocked task is not handed out; explain says what it waits for.
    r = await client.post("/api/v1/tasks/claim", json={"capabilities": ["merge"]},
                          headers=agent("worker-1"))
    assert r.status_code == 204
    r = await client.get(f"/api/v1/tasks/{merge['task_id']}/explain", headers=admin())
    assert r.status_code == 200
    [why] = r.json()["held_back"]
    assert why.startswith("waiting for 2 of its dependencies to complete")
    assert left["task_id"] in why and right["task_id"] in why

    await finish(client, left, {"rows": 1})
    await finish(client, right, {"rows": 2})
    r = await client.get(f"/api/v1/tasks/{merge['task_id']}", headers=ALICE)
    assert r.json()["status"] == "pending"
    # The agent that takes it reads its inputs in one call.
    r = await client.post("/api/v1/tasks/claim", json={"capabilities": ["merge"], "start": True},
                          headers=agent("worker-1"))
    assert r.status_code == 200 and r.json()["task_id"] == merge["task_id"]
    r = await client.get(f"/api/v1/tasks/{merge['task_id']}/dependencies",
                         headers=agent("worker-1"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["waiting_on"] == 0 and body["dependents"] == []
    assert sorted((d["title"], d["status"], d["result"]) for d in body["dependencies"]) == [
        ("fetch left", "completed", {"rows": 1}), ("fetch right", "completed", {"rows": 2})]
    r = await client.get(f"/api/v1/tasks/{left['task_id']}/dependencies", headers=ALICE)
    assert r.json()["dependents"] == [merge["task_id"]]
    r = await client.get("/api/v1/tasks?status=blocked", headers=ALICE)
    assert r.status_code == 200 and r.json() == []


async def test_edges_are_edited_while_the_task_waits(client: httpx.AsyncClient) -> None:
    a = await create(client, "a")
    d = await create(client, "d")
    path = f"/api/v1/tasks/{d['task_id']}/dependencies/{a['task_id']}"
    r = await client.put(path, headers=ALICE)
    assert r.status_code == 200 and r.json()["status"] == "blocked", r.text
    r = await client.put(path, json={"on_failure": "run"}, headers=ALICE)
    assert r.status_code == 200 and r.json()["waiting_on"] == 1
    r = await client.put(f"/api/v1/tasks/{a['task_id']}/dependencies/{d['task_id']}",
                         headers=ALICE)
    assert r.status_code == 400 and "cycle" in r.json()["error"], r.text
    r = await client.put(path, headers=agent("bob"))
    assert r.status_code == 403
    r = await client.delete(path, headers=ALICE)
    assert r.status_code == 200 and r.json()["status"] == "pending"
    r = await client.delete(path, headers=ALICE)
    assert r.status_code == 404


@pytest.mark.parametrize(
    ("depends_on", "field"),
    [
        ("not a list", "depends_on"),
        ([42], "depends_on"),
        (["not-a-uuid"], "depends_on"),
        ([{"task_id": str(uuid.UUID(int=7)), "on_failure": "maybe"}], "depends_on"),
        ([{"task_id": str(uuid.UUID(int=7)), "extra": 1}], "depends_on"),
        ([str(uuid.uuid4())], "depends_on"),  # no such task
    ],
)
async def test_bad_dependencies_are_400_and_write_nothing(
    client: httpx.AsyncClient, sql: Sql, depends_on: Any, field: str
) -> None:
    before = counts(sql)
    r = await client.post("/api/v1/tasks", json={"title": "t", "depends_on": depends_on},
                          headers=ALICE)
    assert r.status_code == 400, r.text
    assert field in r.text
    assert counts(sql) == before


async def test_a_repeated_dependency_and_a_bad_edge_path_are_400(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    a = await create(client, "a")
    before = counts(sql)
    r = await client.post("/api/v1/tasks", json={"title": "t", "depends_on": [
        a["task_id"], a["task_id"]]}, headers=ALICE)
    assert r.status_code == 400 and "more than once" in r.text
    r = await client.put(f"/api/v1/tasks/{a['task_id']}/dependencies/nope", headers=ALICE)
    assert r.status_code == 400
    assert counts(sql) == before
