"""Push and pull are one protocol: a claim returns the caller's own tasks, those the assigner
pushed to it and it has not started, before new ones (a waiting claim woken by a push:
tests/e2e/test_api_lifecycle.py)."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import httpx
import psycopg

from tests.api.conftest import agent, register

ALICE = agent("alice")
BOB = agent("bob")
Sql = psycopg.Connection[dict[str, Any]]


async def create(client: httpx.AsyncClient, title: str, **body: Any) -> Any:
    r = await client.post("/api/v1/tasks", json={"title": title, **body}, headers=ALICE)
    assert r.status_code == 201, r.text
    return r.json()


def assign_round(sql: Sql) -> None:
    """One round of the assigner, as a replica runs it."""
    sql.execute("SELECT dispatch.task_assign()")


def holder(sql: Sql, task_id: str) -> tuple[str, str | None]:
    row = sql.execute(
        "SELECT status::text, assigned_agent FROM dispatch.tasks WHERE task_id = %s", [task_id]
    ).fetchone()
    assert row is not None
    return row["status"], row["assigned_agent"]


async def test_a_claim_returns_the_tasks_pushed_to_the_agent_even_when_it_is_full(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    await register(client, "bob", max_concurrent=2)
    first = await create(client, "first", priority=5)
    second = await create(client, "second")
    assign_round(sql)
    assert holder(sql, first["task_id"]) == holder(sql, second["task_id"]) == ("assigned", "bob")
    # Both of bob's slots hold pushed tasks: before, its claim answered 204 and only a listing
    # showed them.
    r = await client.post("/api/v1/tasks/claim", json={"max_tasks": 2, "start": True},
                          headers=BOB)
    assert r.status_code == 200, r.text
    assert [(t["task_id"], t["status"]) for t in r.json()] == [
        (first["task_id"], "running"), (second["task_id"], "running")]


async def test_own_tasks_come_before_new_ones(client: httpx.AsyncClient, sql: Sql) -> None:
    await register(client, "bob", max_concurrent=3)
    pushed = await create(client, "pushed")
    assign_round(sql)
    fresh = await create(client, "fresh", priority=9)  # higher priority, but not bob's yet
    r = await client.post("/api/v1/tasks/claim", json={"max_tasks": 2}, headers=BOB)
    assert r.status_code == 200, r.text
    assert [t["task_id"] for t in r.json()] == [pushed["task_id"], fresh["task_id"]]
    assert holder(sql, fresh["task_id"]) == ("assigned", "bob")


async def test_a_task_a_claim_handed_out_is_not_handed_out_again(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    await register(client, "bob", max_concurrent=3)
    task = await create(client, "once")
    r = await client.post("/api/v1/tasks/claim", json={}, headers=BOB)
    assert (r.status_code, r.json()["task_id"]) == (200, task["task_id"])
    r = await client.post("/api/v1/tasks/claim", json={}, headers=BOB)
    assert r.status_code == 204
    # A pushed task is handed out until the agent starts it: a claim's answer may be lost.
    pushed = await create(client, "pushed")
    assign_round(sql)
    for _ in range(2):
        r = await client.post("/api/v1/tasks/claim", json={}, headers=BOB)
        assert (r.status_code, r.json()["task_id"]) == (200, pushed["task_id"])
    r = await client.post(f"/api/v1/tasks/{pushed['task_id']}/start", json={}, headers=BOB)
    assert r.status_code == 200, r.text
    r = await client.post("/api/v1/tasks/claim", json={}, headers=BOB)
    assert r.status_code == 204


async def test_another_agents_pushed_task_is_not_returned(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    await register(client, "bob", capabilities=["gpu"])
    await register(client, "carol")
    task = await create(client, "gpu job", required_capabilities=["gpu"])
    assign_round(sql)
    assert holder(sql, task["task_id"]) == ("assigned", "bob")
    r = await client.post("/api/v1/tasks/claim", json={}, headers=agent("carol"))
    assert r.status_code == 204


async def test_a_claim_sent_again_under_its_key_answers_what_it_took(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    await register(client, "bob", capabilities=[], max_concurrent=10)
    made = [await create(client, f"t{i}") for i in range(4)]
    key = {"Idempotency-Key": "claim-1"}
    body = {"max_tasks": 2, "start": True}
    r = await client.post("/api/v1/tasks/claim", json=body, headers={**BOB, **key})
    assert r.status_code == 200, r.text
    first = [t["task_id"] for t in r.json()]
    assert len(first) == 2
    # The answer was lost; the same claim again: the same two tasks, running, and no more taken.
    r = await client.post("/api/v1/tasks/claim", json=body, headers={**BOB, **key})
    assert [t["task_id"] for t in r.json()] == first
    assert all(t["status"] == "running" for t in r.json())
    assert sorted(holder(sql, t["task_id"])[0] for t in made) == [
        "pending", "pending", "running", "running"]
    # Another key is another claim.
    r = await client.post("/api/v1/tasks/claim", json=body,
                          headers={**BOB, "Idempotency-Key": "claim-2"})
    assert {t["task_id"] for t in r.json()}.isdisjoint(first)
    # Once the first claim's tasks are reported on, its key takes anew.
    for task_id in first:
        r = await client.post(f"/api/v1/tasks/{task_id}/complete", json={}, headers=BOB)
        assert r.status_code == 200
    r = await client.post("/api/v1/tasks/claim", json=body, headers={**BOB, **key})
    assert r.status_code == 204


async def test_a_claim_sent_again_answers_the_pushed_tasks_the_first_one_started(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    """The assigner pushed two tasks to bob; his claim under a key started them and its answer
    was lost. The same claim again answers those two, and takes nothing more: otherwise they
    would stay running with an agent that never heard of them until their timeout, and run twice."""
    await register(client, "bob", capabilities=[], max_concurrent=4)
    pushed = [await create(client, f"pushed-{i}") for i in range(2)]
    assign_round(sql)
    later = [await create(client, f"later-{i}") for i in range(2)]
    key = {"Idempotency-Key": "claim-lost"}
    body = {"max_tasks": 2, "start": True}
    r = await client.post("/api/v1/tasks/claim", json=body, headers={**BOB, **key})
    assert r.status_code == 200, r.text
    first = [t["task_id"] for t in r.json()]
    assert first == [t["task_id"] for t in pushed]
    r = await client.post("/api/v1/tasks/claim", json=body, headers={**BOB, **key})
    assert r.status_code == 200, r.text
    assert [(t["task_id"], t["status"]) for t in r.json()] == [(i, "running") for i in first]
    assert [holder(sql, t["task_id"]) for t in later] == [("pending", None)] * 2


def test_a_claim_sent_again_while_the_first_is_still_running_waits_for_it(
    sql: Sql, db_url: str
) -> None:
    """A replica killed mid-claim leaves the claim's transaction running in Postgres; the agent
    sends the claim again, under its key, through another replica. The second waits for the
    first to end and answers what it took, instead of taking other tasks while the first one's
    stay running with an agent that never heard of them."""
    sql.execute("SELECT dispatch.agent_upsert('bob', '{}', NULL, 10)")
    made = [sql.execute("INSERT INTO dispatch.tasks (title) VALUES (%s) RETURNING task_id::text",
                        [f"t{i}"]).fetchone() for i in range(4)]
    claim = "SELECT task_id::text FROM dispatch.task_claim('bob', NULL, now(), 2, true, 'lost')"
    with psycopg.connect(db_url) as first:  # the killed replica's session, mid-transaction
        took = sorted(row[0] for row in first.execute(claim).fetchall())
        assert len(took) == 2
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            def again() -> list[str]:
                with psycopg.connect(db_url, autocommit=True) as conn:
                    return sorted(row[0] for row in conn.execute(claim).fetchall())
            answer = pool.submit(again)
            time.sleep(0.5)
            assert not answer.done()  # waiting for the first claim's transaction
            first.commit()
            assert answer.result(timeout=10) == took
    assert sorted(holder(sql, row["task_id"])[0] for row in made if row) == [
        "pending", "pending", "running", "running"]
