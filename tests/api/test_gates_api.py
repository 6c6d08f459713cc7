"""Gates over REST: a task created with `approval` waits for approve (or reject), and its result
waits for accept (or request-changes) when the gate says review."""

from __future__ import annotations

from typing import Any

import httpx
import psycopg

from tests.api.conftest import agent, counts, register

ALICE = agent("alice")
WORKER = agent("worker-1")
Sql = psycopg.Connection[dict[str, Any]]


async def test_a_gated_task_from_approval_to_accepted_result(client: httpx.AsyncClient) -> None:
    await register(client, "worker-1", capabilities=["write"])
    r = await client.post("/api/v1/tasks", headers=ALICE, json={
        "title": "draft the release notes", "scope": "write", "approval": "both"})
    assert r.status_code == 201, r.text
    task = r.json()
    tid = task["task_id"]
    assert task["status"] == "blocked" and task["approval"] == "both"
    assert (await client.post("/api/v1/tasks/claim", headers=WORKER, json={})).status_code == 204
    r = await client.post(f"/api/v1/tasks/{tid}/approve", headers=agent("bob"))
    assert r.status_code == 403
    r = await client.post(f"/api/v1/tasks/{tid}/approve", headers=ALICE)
    assert r.status_code == 200 and r.json()["status"] == "pending", r.text

    # The agent's completion is held for review; the reviewer asks for changes.
    r = await client.post("/api/v1/tasks/claim", headers=WORKER, json={"start": True})
    assert r.status_code == 200 and r.json()["task_id"] == tid
    r = await client.post(f"/api/v1/tasks/{tid}/complete", headers=WORKER,
                          json={"result": {"notes": "v1"}})
    assert r.status_code == 200 and r.json()["status"] == "review", r.text
    r = await client.post(f"/api/v1/tasks/{tid}/request-changes", headers=ALICE, json={})
    assert r.status_code == 400 and "feedback" in r.text
    r = await client.post(f"/api/v1/tasks/{tid}/request-changes", headers=ALICE,
                          json={"feedback": "mention the new CLI"})
    assert r.status_code == 200 and r.json()["status"] == "pending"
    assert r.json()["feedback"] == "mention the new CLI" and r.json()["retry_count"] == 1

    # The next attempt (after the retry's backoff) reads the feedback; this time it is accepted.
    await client.post("/api/v1/tasks/claim", headers=WORKER,
                      json={"start": True, "wait_seconds": 10})
    r = await client.get(f"/api/v1/tasks/{tid}", headers=WORKER)
    assert r.json()["status"] == "running" and r.json()["feedback"] == "mention the new CLI"
    r = await client.post(f"/api/v1/tasks/{tid}/complete", headers=WORKER,
                          json={"result": {"notes": "v2, with the CLI"}})
    assert r.json()["status"] == "review"
    r = await client.post(f"/api/v1/tasks/{tid}/accept", headers=ALICE)
    assert r.status_code == 200 and r.json()["status"] == "completed"
    events = [e["event"] for e in (await client.get(f"/api/v1/tasks/{tid}/events",
                                                    headers=ALICE)).json()]
    assert events == ["created", "blocked", "approved", "unblocked", "assigned", "started",
                      "in_review", "changes_requested", "retry", "assigned", "started",
                      "in_review", "accepted", "completed"]


async def test_reject_and_bad_gates(client: httpx.AsyncClient, sql: Sql) -> None:
    before = counts(sql)
    r = await client.post("/api/v1/tasks", headers=ALICE, json={"title": "t",
                                                                 "approval": "sometimes"})
    assert r.status_code == 400 and "approval" in r.text
    assert counts(sql) == before
    r = await client.post("/api/v1/tasks", headers=ALICE, json={"title": "deploy",
                                                                 "approval": "before_start"})
    tid = r.json()["task_id"]
    r = await client.post(f"/api/v1/tasks/{tid}/accept", headers=ALICE)
    assert r.status_code == 409
    r = await client.post(f"/api/v1/tasks/{tid}/reject", headers=ALICE,
                          json={"reason": "freeze until Monday"})
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert r.json()["error"] == "rejected by alice: freeze until Monday"


async def test_suspend_and_signal_over_rest(client: httpx.AsyncClient) -> None:
    await register(client, "worker-1", capabilities=[])
    r = await client.post("/api/v1/tasks", headers=ALICE, json={"title": "book a flight"})
    tid = r.json()["task_id"]
    r = await client.post("/api/v1/tasks/claim", headers=WORKER, json={"start": True})
    lease = r.json()["lease"]
    r = await client.post(f"/api/v1/tasks/{tid}/signal", headers=ALICE, json={"payload": 1})
    assert r.status_code == 409  # not waiting yet
    r = await client.post(f"/api/v1/tasks/{tid}/suspend", headers=WORKER,
                          json={"waiting_for": "which seat", "timeout_seconds": 0})
    assert r.status_code == 400
    r = await client.post(f"/api/v1/tasks/{tid}/suspend", headers=WORKER,
                          json={"waiting_for": "which seat", "timeout_seconds": 900,
                                "lease": lease})
    assert r.status_code == 200 and r.json()["status"] == "suspended", r.text
    r = await client.post(f"/api/v1/tasks/{tid}/signal", headers=agent("bob"), json={})
    assert r.status_code == 403
    r = await client.post(f"/api/v1/tasks/{tid}/signal", headers=ALICE,
                          json={"payload": {"seat": "12A"}})
    assert r.status_code == 200 and r.json()["status"] == "assigned", r.text
    # The worker's next claim returns it, with the answer.
    r = await client.post("/api/v1/tasks/claim", headers=WORKER, json={"start": True})
    assert r.json()["task_id"] == tid and r.json()["signal"] == {"seat": "12A"}
