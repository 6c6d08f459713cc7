"""Fewer round trips: claim several tasks (and start them) in one call, and report on several
tasks in one request and one transaction, each report fenced on its own."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import psycopg

from tests.api.conftest import agent, counts, register
from tests.api.test_tasks_api import ALICE, create

BOB = agent("bob")
CAROL = agent("carol")


async def events(client: httpx.AsyncClient, task_id: str) -> list[str]:
    r = await client.get(f"/api/v1/tasks/{task_id}/events", headers=ALICE)
    return [e["event"] for e in r.json()]


async def test_claim_several_and_start_them(client: httpx.AsyncClient) -> None:
    ids = [(await create(client, priority=i))["task_id"] for i in range(5)]
    await client.put("/api/v1/agents/bob", json={"max_concurrent": 3}, headers=BOB)
    r = await client.post(
        "/api/v1/tasks/claim", json={"max_tasks": 5, "start": True}, headers=BOB
    )
    assert r.status_code == 200
    claimed = r.json()
    # Its limit is 3: the three most urgent, already running.
    assert [t["task_id"] for t in claimed] == [ids[4], ids[3], ids[2]]
    assert {t["status"] for t in claimed} == {"running"}
    assert await events(client, ids[4]) == ["created", "assigned", "started"]
    r = await client.post("/api/v1/tasks/claim", json={"max_tasks": 5}, headers=BOB)
    assert r.status_code == 204
    # Without max_tasks the answer is one task, as before.
    await client.put("/api/v1/agents/carol", json={}, headers=CAROL)
    r = await client.post("/api/v1/tasks/claim", json={}, headers=CAROL)
    assert r.status_code == 200 and r.json()["task_id"] == ids[1]
    assert r.json()["status"] == "assigned"


async def test_claim_max_tasks_out_of_range_is_400(client: httpx.AsyncClient) -> None:
    await register(client, "bob")
    await create(client)
    for bad in (0, 101, True, -1):
        r = await client.post("/api/v1/tasks/claim", json={"max_tasks": bad}, headers=BOB)
        assert r.status_code == 400, (bad, r.text)


async def test_reports_apply_each_on_its_own(client: httpx.AsyncClient) -> None:
    ids = [(await create(client, max_retries=0))["task_id"] for _ in range(4)]
    await client.put("/api/v1/agents/bob", json={"max_concurrent": 3}, headers=BOB)
    await client.put("/api/v1/agents/carol", json={}, headers=CAROL)
    r = await client.post("/api/v1/tasks/claim", json={"max_tasks": 3}, headers=BOB)
    mine = [t["task_id"] for t in r.json()]
    carols = (await client.post("/api/v1/tasks/claim", json={}, headers=CAROL)).json()["task_id"]
    assert sorted([*mine, carols]) == sorted(ids)
    unknown = str(uuid.uuid4())
    r = await client.post(
        "/api/v1/tasks/reports",
        json=[
            {"task_id": mine[0], "action": "start"},
            {"task_id": mine[0], "action": "progress", "progress": 0.5, "detail": "half"},
            {"task_id": mine[1], "action": "complete", "result": {"n": 1}},
            {"task_id": mine[2], "action": "fail", "error": "no", "retry_eligible": False},
            {"task_id": carols, "action": "complete", "result": {}},
            {"task_id": unknown, "action": "start"},
            {"task_id": mine[1], "action": "start"},
        ],
        headers=BOB,
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert [o["status"] for o in out] == [200, 200, 200, 200, 403, 404, 409]
    assert [o["task_id"] for o in out] == [
        mine[0], mine[0], mine[1], mine[2], carols, unknown, mine[1],
    ]
    assert out[1]["task"]["progress"] == {"percent": 50, "message": "half"}
    assert out[2]["task"]["status"] == "completed" and out[2]["task"]["result"] == {"n": 1}
    assert out[3]["task"]["status"] == "failed"
    assert out[4]["error"] and out[4]["task"] is None
    assert out[6]["task"]["status"] == "completed"  # a 409 carries the task as it is now
    # The refused ones changed nothing.
    r = await client.get(f"/api/v1/tasks/{carols}", headers=ALICE)
    assert r.json()["status"] == "assigned"
    assert await events(client, mine[1]) == ["created", "assigned", "completed"]


async def test_a_malformed_batch_changes_nothing(
    client: httpx.AsyncClient, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    await register(client, "bob")
    task = await create(client)
    await client.post("/api/v1/tasks/claim", json={}, headers=BOB)
    before = counts(sql)
    good = {"task_id": task["task_id"], "action": "start"}
    for body, field in (
        ([], None),
        ([good] * 101, None),
        ([good, {"task_id": task["task_id"], "action": "complete", "error": "x"}], "error"),
        ([good, {"task_id": task["task_id"], "action": "finish"}], None),
        ([good, {"task_id": task["task_id"], "action": "start", "colour": "red"}], None),
        ([good, {"task_id": "nope", "action": "start"}], None),
        ({"task_id": task["task_id"], "action": "start"}, None),
    ):
        r = await client.post("/api/v1/tasks/reports", json=body, headers=BOB)
        assert r.status_code == 400, (body, r.text)
        if field is not None:
            assert r.json()["detail"]["field"] == field
    assert counts(sql) == before
    r = await client.get(f"/api/v1/tasks/{task['task_id']}", headers=ALICE)
    assert r.json()["status"] == "assigned"
