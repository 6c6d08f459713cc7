"""What an adversarial pass found (issue [reliability]), each as the user would meet it: poison
timestamps, stale attempts, half-applied PATCHes, late reports after a manual resolution, claims
that widen capabilities or register strangers, non-JSON bodies, and a report that hid work."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import psycopg
import pytest

from dispatch.db import CONNECT_KWARGS
from tests.api.conftest import admin, agent, counts, register

ALICE = agent("alice")
BOB = agent("bob")

Sql = psycopg.Connection[dict[str, Any]]


async def create(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    r = await client.post("/api/v1/tasks", json={"title": "t", **body}, headers=ALICE)
    assert r.status_code == 201, r.text
    return dict(r.json())


# -- 1. poison timestamps ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "available_at",
    [
        "9999-12-31T23:59:59-01:00",  # year 10000 in UTC
        "0001-01-01T00:30:00+01:00",  # year 0 in UTC
        "9999-06-01T00:00:00Z",
        "1969-12-31T23:59:59Z",
    ],
)
async def test_an_unreadable_timestamp_is_400_and_writes_nothing(
    client: httpx.AsyncClient, sql: Sql, available_at: str
) -> None:
    before = counts(sql)
    r = await client.post(
        "/api/v1/tasks", json={"title": "poison", "available_at": available_at}, headers=ALICE
    )
    assert r.status_code == 400, r.text
    assert r.json()["detail"]["field"] == "available_at"
    assert counts(sql) == before
    # The list and the stats still work for everyone.
    r = await client.get("/api/v1/tasks", headers=ALICE)
    assert r.status_code == 200 and r.json() == []
    r = await client.get("/api/v1/tasks?status=pending", headers=BOB)
    assert r.status_code == 200


async def test_psql_cannot_store_a_timestamp_the_service_could_not_read(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    task = await create(client)
    with pytest.raises(psycopg.errors.CheckViolation):
        sql.execute(
            "INSERT INTO dispatch.tasks (title, requester, source, timeout_seconds, available_at)"
            " VALUES ('poison', 'dba', 'sql', 60, '9999-12-31T23:59:59-01:00')"
        )
    for column in ("available_at", "created_at", "deadline_at"):
        for value in ("infinity", "0001-01-01T00:30:00+01:00"):
            with pytest.raises(psycopg.errors.CheckViolation):
                sql.execute(
                    f"UPDATE dispatch.tasks SET {column} = %s WHERE task_id = %s",
                    (value, task["task_id"]),
                )
    await register(client, "bob")
    with pytest.raises(psycopg.errors.CheckViolation):
        sql.execute("UPDATE dispatch.agents SET last_seen_at = 'infinity'")
    r = await client.get("/api/v1/tasks", headers=ALICE)
    assert r.status_code == 200 and [t["task_id"] for t in r.json()] == [task["task_id"]]


# -- 2. stale attempts -----------------------------------------------------------------------------


async def second_attempt(client: httpx.AsyncClient, sql: Sql) -> tuple[str, int, int]:
    """bob held attempt 1, failed it, and was given the task again: (task id, the lease of
    attempt 1, its lease now)."""
    await register(client, "bob")
    tid = (await create(client, max_retries=3))["task_id"]
    r = await client.post("/api/v1/tasks/claim", json={}, headers=BOB)
    assert r.status_code == 200
    first = r.json()["lease"]
    r = await client.post(f"/api/v1/tasks/{tid}/fail", json={"error": "flaky"}, headers=BOB)
    assert r.json()["status"] == "pending"
    # A DBA skips the retry's backoff; nobody else is eligible, so bob gets it again.
    sql.execute("UPDATE dispatch.tasks SET available_at = now() WHERE task_id = %s", (tid,))
    r = await client.post("/api/v1/tasks/claim", json={}, headers=BOB)
    assert r.status_code == 200 and r.json()["task_id"] == tid
    lease = r.json()["lease"]
    assert r.json()["retry_count"] == 1 and 1 <= lease < 2**31 and lease != first
    return tid, first, lease


async def test_a_report_of_an_earlier_attempt_is_409_even_from_the_same_agent(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    tid, first, lease = await second_attempt(client, sql)
    events_before = counts(sql)[1]
    stale = [
        ("start", {"lease": first}),
        ("progress", {"percent": 50, "lease": first}),
        ("complete", {"result": {"from": "attempt 1"}, "lease": first}),
        ("fail", {"error": "late", "retry_eligible": False, "lease": first}),
    ]
    for action, body in stale:
        r = await client.post(f"/api/v1/tasks/{tid}/{action}", json=body, headers=BOB)
        assert r.status_code == 409, (action, r.text)
        assert f"lease {first} " in r.json()["error"] and r.json()["detail"]["lease"] == lease
    # The header form, and the batch form.
    r = await client.post(f"/api/v1/tasks/{tid}/complete", json={"result": 1},
                          headers={**BOB, "X-Dispatch-Lease": str(first)})
    assert r.status_code == 409
    r = await client.post("/api/v1/tasks/reports", headers=BOB, json=[
        {"task_id": tid, "action": "complete", "result": 1, "lease": first},
    ])
    assert r.status_code == 200 and r.json()[0]["status"] == 409
    assert counts(sql)[1] == events_before
    task = (await client.get(f"/api/v1/tasks/{tid}", headers=ALICE)).json()
    assert (task["status"], task["result"]) == ("assigned", None)

    # The current lease works; so does no lease at all (the original service's clients).
    r = await client.post(f"/api/v1/tasks/{tid}/start", json={"lease": lease}, headers=BOB)
    assert r.status_code == 200 and r.json()["status"] == "running"
    r = await client.post(f"/api/v1/tasks/{tid}/progress", json={"percent": 10}, headers=BOB)
    assert r.status_code == 200
    r = await client.post(f"/api/v1/tasks/{tid}/complete", json={"result": {"from": "attempt 2"}},
                          headers={**BOB, "X-Dispatch-Lease": str(lease)})
    assert r.status_code == 200 and r.json()["result"] == {"from": "attempt 2"}
    # A repeat of that complete is still answered as a repeat; with the old lease it is not.
    r = await client.post(f"/api/v1/tasks/{tid}/complete", json={"result": {"from": "attempt 2"},
                                                                  "lease": lease}, headers=BOB)
    assert r.status_code == 200
    r = await client.post(f"/api/v1/tasks/{tid}/complete", json={"lease": first}, headers=BOB)
    assert r.status_code == 409


async def test_body_and_header_lease_must_agree(client: httpx.AsyncClient, sql: Sql) -> None:
    tid, first, lease = await second_attempt(client, sql)
    r = await client.post(f"/api/v1/tasks/{tid}/complete", json={"lease": lease},
                          headers={**BOB, "X-Dispatch-Lease": str(first)})
    assert r.status_code == 400 and r.json()["detail"]["field"] == "lease"
    for bad in (0, -1, "x", 2**40):
        r = await client.post(f"/api/v1/tasks/{tid}/complete", json={"lease": bad}, headers=BOB)
        assert r.status_code == 400, bad


# -- 5. the smaller ones -----------------------------------------------------------------------


async def test_a_refused_part_of_a_patch_undoes_the_cancel(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    tid = (await create(client))["task_id"]
    before = counts(sql)
    r = await client.patch(f"/api/v1/tasks/{tid}",
                           json={"status": "cancelled", "metadata": {"k": "a\u0000b"}},
                           headers=ALICE)
    assert r.status_code == 400, r.text
    assert counts(sql) == before
    task = (await client.get(f"/api/v1/tasks/{tid}", headers=ALICE)).json()
    assert (task["status"], task["metadata"]) == ("pending", {})
    r = await client.patch(f"/api/v1/tasks/{tid}",
                           json={"status": "cancelled", "metadata": {"k": "ok"}}, headers=ALICE)
    assert r.status_code == 200
    assert (r.json()["status"], r.json()["metadata"]) == ("cancelled", {"k": "ok"})


async def test_after_a_manual_resolution_the_agents_complete_is_409(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    await register(client, "bob")
    tid = (await create(client))["task_id"]
    await client.post("/api/v1/tasks/claim", json={"start": True, "max_tasks": 1}, headers=BOB)
    r = await client.post(f"/api/v1/tasks/{tid}/complete", json={"result": {"by": "alice"}},
                          headers=ALICE)
    assert r.status_code == 200 and r.json()["result"] == {"by": "alice"}
    assert r.json()["previous_agents"] == ["bob"] and r.json()["assigned_agent"] is None
    r = await client.post(f"/api/v1/tasks/{tid}/complete", json={"result": {"by": "bob"}},
                          headers=BOB)
    assert r.status_code == 409, r.text
    assert r.json()["detail"]["result"] == {"by": "alice"}
    # bob's slot is free again.
    row = sql.execute("SELECT dispatch.agent_active('bob') AS n").fetchone()
    assert row is not None and row["n"] == 0


async def test_claim_capabilities_narrow_and_never_widen(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    await register(client, "bob", capabilities=["review"])
    code = (await create(client, required_capabilities=["code"]))["task_id"]
    r = await client.post("/api/v1/tasks/claim", json={"capabilities": ["code"]}, headers=BOB)
    assert r.status_code == 204
    r = await client.post("/api/v1/tasks/claim", json={"capabilities": ["code", "review"]},
                          headers=BOB)
    assert r.status_code == 204
    review = (await create(client, required_capabilities=["review"]))["task_id"]
    r = await client.post("/api/v1/tasks/claim", json={"capabilities": ["code"]}, headers=BOB)
    assert r.status_code == 204  # narrowed to nothing bob has: no review work either
    r = await client.post("/api/v1/tasks/claim", json={"capabilities": ["review", "code"]},
                          headers=BOB)
    assert r.status_code == 200 and r.json()["task_id"] == review
    task = (await client.get(f"/api/v1/tasks/{code}", headers=ALICE)).json()
    assert task["status"] == "pending"
    agent_row = sql.execute(
        "SELECT capabilities FROM dispatch.agents WHERE agent_id = 'bob'"
    ).fetchone()
    assert agent_row is not None and agent_row["capabilities"] == ["review"]


async def test_a_claim_from_an_unknown_agent_is_refused_and_registers_nothing(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    await create(client)
    before = counts(sql)
    r = await client.post("/api/v1/tasks/claim", json={"capabilities": ["x"]},
                          headers=agent("stranger"))
    assert r.status_code == 404 and "register" in r.json()["error"]
    assert counts(sql) == before


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/plain", b'{"title": "t"}'),
        ("application/x-www-form-urlencoded", b"title=t"),
        ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="title"'
                                            b"\r\n\r\nt\r\n--x--\r\n"),
        (None, b'{"title": "t"}'),
    ],
)
async def test_a_body_that_is_not_declared_json_is_415(
    client: httpx.AsyncClient, sql: Sql, content_type: str | None, body: bytes
) -> None:
    before = counts(sql)
    headers = dict(ALICE)
    if content_type is not None:
        headers["Content-Type"] = content_type
    r = await client.post("/api/v1/tasks", content=body, headers=headers)
    if content_type is None:
        # httpx sends no Content-Type for raw content: still not declared JSON.
        assert "content-type" not in r.request.headers
    assert r.status_code == 415, r.text
    assert counts(sql) == before
    r = await client.post("/api/v1/tasks", content=b'{"title": "t"}',
                          headers={**ALICE, "Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 201
    r = await client.post("/api/v1/tasks/claim", headers=admin())  # no body: no type needed
    assert r.status_code in (200, 204, 404)


async def test_the_unmatched_report_does_not_hide_work_from_a_claim(
    client: httpx.AsyncClient, db_url: str
) -> None:
    """The reaper reports a task no agent can take; while its transaction is still open, an agent
    that can take it registers and claims without waiting: it gets the task."""
    tid = (await create(client, required_capabilities=["rare"]))["task_id"]
    with psycopg.connect(db_url, **CONNECT_KWARGS) as reaper, reaper.transaction():  # type: ignore[arg-type]
        row = reaper.execute("SELECT dispatch.task_report_unmatched()").fetchone()
        assert row is not None and row[0] == 1
        await register(client, "bob", capabilities=["rare"])
        r = await client.post("/api/v1/tasks/claim", json={"wait_seconds": 0}, headers=BOB)
        assert r.status_code == 200, r.status_code
        assert r.json()["task_id"] == tid


async def test_a_row_written_around_the_range_check_does_not_stop_the_list(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    """A row that holds an unreadable time anyway (written before the check existed, or by a DBA
    who dropped it) reads as the earliest or latest time: it cannot stop the list for everyone."""
    task = await create(client)
    # Off the event loop: the app's loops may hold a transaction open on this same loop.
    await asyncio.to_thread(
        sql.execute, "ALTER TABLE dispatch.tasks DROP CONSTRAINT tasks_available_at_range"
    )
    await asyncio.to_thread(
        sql.execute, "ALTER TABLE dispatch.tasks DROP CONSTRAINT tasks_times_range"
    )
    await asyncio.to_thread(
        sql.execute,
        "UPDATE dispatch.tasks SET available_at = '9999-12-31T23:59:59-01:00',"
        " deadline_at = 'infinity', started_at = '0001-01-01T00:30:00+01:00' WHERE task_id = %s",
        (task["task_id"],),
    )
    other = await create(client)
    for query in ("", "?status=pending"):
        r = await client.get(f"/api/v1/tasks{query}", headers=BOB)
        assert r.status_code == 200, r.text
        assert {t["task_id"] for t in r.json()} == {task["task_id"], other["task_id"]}
    got = (await client.get(f"/api/v1/tasks/{task['task_id']}", headers=ALICE)).json()
    assert got["available_at"].startswith("9999-12-31T23:59:59")
    assert got["deadline_at"].startswith("9999-12-31T23:59:59")
    assert got["started_at"].startswith("0001-01-01T00:00:00")
