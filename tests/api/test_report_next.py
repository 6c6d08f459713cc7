"""A completion or failure that asks for the next task: one request, one transaction, and the
answer carries what the agent claimed next."""

from __future__ import annotations

from typing import Any

import httpx
import psycopg

from tests.api.conftest import agent, counts, register

ALICE = agent("alice")
BOB = agent("bob")
Sql = psycopg.Connection[dict[str, Any]]


async def create(client: httpx.AsyncClient, title: str, **body: Any) -> Any:
    r = await client.post("/api/v1/tasks", json={"title": title, **body}, headers=ALICE)
    assert r.status_code == 201, r.text
    return r.json()


async def claimed(client: httpx.AsyncClient) -> Any:
    r = await client.post("/api/v1/tasks/claim", json={"start": True}, headers=BOB)
    assert r.status_code == 200, r.text
    return r.json()


async def test_complete_hands_over_the_next_task_started(client: httpx.AsyncClient) -> None:
    await register(client, "bob", max_concurrent=1)
    await create(client, "first", priority=5)
    second = await create(client, "second")
    first = await claimed(client)
    r = await client.post(
        f"/api/v1/tasks/{first['task_id']}/complete",
        json={"result": {"ok": 1}, "next": {"start": True}},
        headers=BOB,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["task_id"], body["status"], body["result"]) == (
        first["task_id"], "completed", {"ok": 1})
    # The agent's one slot was freed by the completion in the same transaction.
    assert [(t["task_id"], t["status"], t["assigned_agent"]) for t in body["next"]] == [
        (second["task_id"], "running", "bob")]


async def test_without_next_the_answer_is_the_task_as_before(client: httpx.AsyncClient) -> None:
    await register(client, "bob")
    await create(client, "only")
    task = await claimed(client)
    r = await client.post(f"/api/v1/tasks/{task['task_id']}/complete", json={}, headers=BOB)
    assert r.status_code == 200
    assert "next" not in r.json()


async def test_fail_asks_for_several_and_an_empty_queue_answers_none(
    client: httpx.AsyncClient,
) -> None:
    await register(client, "bob", max_concurrent=5)
    task = await create(client, "flaky", max_retries=0)
    await claimed(client)
    r = await client.post(
        f"/api/v1/tasks/{task['task_id']}/fail",
        json={"error": "boom", "next": {"max_tasks": 3, "wait_seconds": 0.2}},
        headers=BOB,
    )
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["next"]) == ("failed", [])
    more = [await create(client, f"more {i}") for i in range(4)]
    other = await create(client, "other")
    await client.post("/api/v1/tasks/claim", json={"start": True}, headers=BOB)
    r = await client.post(
        f"/api/v1/tasks/{more[0]['task_id']}/fail",
        json={"error": "boom", "retry_eligible": False, "next": {"max_tasks": 3}},
        headers=BOB,
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "failed"
    # Oldest first, as a claim takes them; not started, since `start` was not asked for.
    assert [(t["task_id"], t["status"]) for t in r.json()["next"]] == [
        (m["task_id"], "assigned") for m in more[1:]]
    assert other["task_id"] not in {t["task_id"] for t in r.json()["next"]}


async def test_a_stale_report_claims_nothing_and_changes_nothing(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    await register(client, "bob")
    await register(client, "carol")
    task = await create(client, "contested")
    await create(client, "waiting")
    await claimed(client)
    before = counts(sql)
    r = await client.post(
        f"/api/v1/tasks/{task['task_id']}/complete", json={"next": {"start": True}},
        headers=agent("carol"),
    )
    assert r.status_code == 403, r.text
    assert counts(sql) == before
    assert sql.execute(
        "SELECT count(*) AS n FROM dispatch.tasks WHERE status <> 'pending'"
    ).fetchone() == {"n": 1}


async def test_a_bad_next_is_refused_before_anything_changes(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    await register(client, "bob")
    await create(client, "t")
    task = await claimed(client)
    before = counts(sql)
    for bad in ({"max_tasks": 0}, {"max_tasks": 101}, {"wait_seconds": 31}, {"start": "yes"},
                {"capabilities": ["x"]}, []):
        r = await client.post(
            f"/api/v1/tasks/{task['task_id']}/complete", json={"next": bad}, headers=BOB
        )
        assert r.status_code == 400, (bad, r.text)
    assert counts(sql) == before


async def test_a_failed_claim_leaves_the_report_standing(client: httpx.AsyncClient) -> None:
    # The requester resolves her own task by hand and asks for more, though she is no agent:
    # her claim is refused, the resolution stands, and she is handed nothing.
    task = await create(client, "resolved by hand")
    r = await client.post(
        f"/api/v1/tasks/{task['task_id']}/complete",
        json={"result": "done by hand", "next": {"start": True}},
        headers=ALICE,
    )
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["next"]) == ("completed", [])
    r = await client.get(f"/api/v1/tasks/{task['task_id']}", headers=ALICE)
    assert (r.json()["status"], r.json()["result"]) == ("completed", "done by hand")
    r = await client.post("/api/v1/tasks/claim", headers=ALICE)
    assert r.status_code == 404, r.text


async def test_a_batch_hands_over_the_next_tasks_on_the_report_that_asks(
    client: httpx.AsyncClient,
) -> None:
    await register(client, "bob", max_concurrent=2)
    tasks = [await create(client, f"t{i}") for i in range(4)]
    first = [await claimed(client) for _ in range(2)]
    r = await client.post("/api/v1/tasks/reports", json=[
        {"task_id": first[0]["task_id"], "action": "complete", "result": 1},
        {"task_id": first[1]["task_id"], "action": "fail", "error": "no", "retry_eligible": False,
         "next": {"max_tasks": 2, "start": True}},
    ], headers=BOB)
    assert r.status_code == 200, r.text
    done, failed = r.json()
    assert (done["status"], done["task"]["status"], "next" in done) == (200, "completed", False)
    assert (failed["status"], failed["task"]["status"]) == (200, "failed")
    assert [(t["task_id"], t["status"]) for t in failed["next"]] == [
        (t["task_id"], "running") for t in tasks[2:]]


async def test_a_batch_whose_asking_report_is_refused_claims_nothing(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    await register(client, "bob")
    task = await create(client, "someone else's")
    await create(client, "waiting")
    r = await client.post("/api/v1/tasks/reports", json=[
        {"task_id": task["task_id"], "action": "complete", "next": {"start": True}},
    ], headers=BOB)
    assert r.status_code == 200, r.text
    [outcome] = r.json()
    assert outcome["status"] == 403 and "next" not in outcome
    assert sql.execute(
        "SELECT count(*) AS n FROM dispatch.tasks WHERE status = 'pending'"
    ).fetchone() == {"n": 2}


async def test_next_in_a_batch_is_refused_where_it_does_not_belong(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    await register(client, "bob", max_concurrent=2)
    await create(client, "a")
    await create(client, "b")
    a, b = await claimed(client), await claimed(client)
    before = counts(sql)
    for reports in (
        [{"task_id": a["task_id"], "action": "progress", "percent": 5, "next": {}}],
        [{"task_id": a["task_id"], "action": "complete", "next": {}},
         {"task_id": b["task_id"], "action": "complete", "next": {}}],
    ):
        r = await client.post("/api/v1/tasks/reports", json=reports, headers=BOB)
        assert r.status_code == 400, r.text
        assert r.json()["detail"] == {"field": "next"}
    assert counts(sql) == before
