"""The REST API in process, over a real broker and database: what a client sees."""

from __future__ import annotations

from typing import Any

import httpx
import psycopg
import pytest
from litestar.testing import AsyncTestClient

from dispatch.broker import Broker
from dispatch.service import web_app
from dispatch.settings import ServerSettings, Settings, UiSettings
from tests.api.conftest import admin, agent, register

ALICE = agent("alice")
BOB = agent("bob")


async def create(client: httpx.AsyncClient, headers: dict[str, str] = ALICE, **body: Any) -> Any:
    r = await client.post("/api/v1/tasks", json={"title": "t", **body}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


async def test_create_returns_the_task_with_the_original_field_names(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post(
        "/api/v1/tasks",
        json={"title": "summarise", "scope": "Summarise ", "context": {"doc": 7}, "priority": 4},
        headers=ALICE,
    )
    assert r.status_code == 201
    task = r.json()
    assert r.headers["location"] == f"/api/v1/tasks/{task['task_id']}"
    assert task["required_capabilities"] == ["summarise"]
    assert task["metadata"] == {"doc": 7}
    assert (task["requester"], task["owner"], task["source"]) == ("alice", None, "api")
    assert (task["status"], task["priority"], task["max_retries"]) == ("pending", 4, 3)
    assert task["created_at"].endswith("Z")
    for name in ("task_id", "assigned_agent", "retry_count", "timeout_seconds",
                 "heartbeat_seconds", "progress", "result", "error", "parent_task_id",
                 "idempotency_key", "available_at", "deadline_at", "updated_at", "assigned_at",
                 "started_at", "completed_at", "description"):
        assert name in task
    r = await client.get(f"/api/v1/tasks/{task['task_id']}", headers=BOB)
    assert r.status_code == 200 and r.json() == task


async def test_idempotency_key_returns_the_original_with_200(client: httpx.AsyncClient) -> None:
    headers = {**ALICE, "Idempotency-Key": "job-1"}
    first = await client.post("/api/v1/tasks", json={"title": "a"}, headers=headers)
    again = await client.post("/api/v1/tasks", json={"title": "b"}, headers=headers)
    other = await client.post(
        "/api/v1/tasks", json={"title": "a"}, headers={**BOB, "Idempotency-Key": "job-1"}
    )
    assert (first.status_code, again.status_code, other.status_code) == (201, 200, 201)
    assert again.json() == first.json()
    assert first.json()["idempotency_key"] == "job-1"
    assert other.json()["task_id"] != first.json()["task_id"]


async def test_pull_lifecycle_and_history(client: httpx.AsyncClient) -> None:
    task = await create(client, required_capabilities=["code"])
    tid = task["task_id"]
    r = await client.put("/api/v1/agents/bob", json={"capabilities": ["code"]}, headers=BOB)
    assert r.status_code == 200 and r.json()["capabilities"] == ["code"]
    r = await client.post("/api/v1/tasks/claim", json={}, headers=BOB)
    assert r.status_code == 200
    assert (r.json()["task_id"], r.json()["status"], r.json()["assigned_agent"]) == (
        tid, "assigned", "bob",
    )
    r = await client.post(f"/api/v1/tasks/{tid}/progress", json={"percent": 42.5,
                                                                  "message": "half"},
                          headers=BOB)
    assert r.status_code == 200
    assert r.json()["status"] == "running"  # a first progress report starts the task
    assert r.json()["progress"] == {"percent": 42.5, "message": "half"}
    r = await client.post(f"/api/v1/tasks/{tid}/complete", json={"result": {"ok": True}},
                          headers=BOB)
    assert r.json()["status"] == "completed" and r.json()["result"] == {"ok": True}
    again = await client.post(f"/api/v1/tasks/{tid}/complete", json={"result": {"ok": True}},
                              headers=BOB)
    assert again.status_code == 200 and again.json() == r.json()  # a retried response
    r = await client.get(f"/api/v1/tasks/{tid}/events", headers=ALICE)
    events = r.json()
    assert [e["event"] for e in events] == [
        "created", "assigned", "started", "progress", "completed",
    ]
    assert events[-1]["actor"] == "bob"


async def test_claim_with_nothing_to_do_is_204(client: httpx.AsyncClient) -> None:
    await register(client, "bob")
    await create(client, required_capabilities=["gpu"])
    r = await client.post("/api/v1/tasks/claim", json={"capabilities": ["cpu"]}, headers=BOB)
    assert r.status_code == 204 and r.content == b""
    r = await client.post("/api/v1/tasks/claim", headers=BOB)  # no body at all
    assert r.status_code == 204


async def test_fail_retries_then_dead_letters_then_admin_requeues(
    client: httpx.AsyncClient,
) -> None:
    await register(client, "bob")
    tid = (await create(client, max_retries=1))["task_id"]
    await client.post("/api/v1/tasks/claim", headers=BOB)
    r = await client.post(f"/api/v1/tasks/{tid}/fail", json={"error": "boom"}, headers=BOB)
    assert r.status_code == 200
    assert (r.json()["status"], r.json()["retry_count"], r.json()["error"]) == (
        "pending", 1, "boom",
    )
    r = await client.get("/api/v1/tasks?status=pending", headers=ALICE)
    assert [t["task_id"] for t in r.json()] == [tid]
    # The retry waits out its backoff: an admin requeue makes it available now.
    r = await client.patch(f"/api/v1/tasks/{tid}", json={"status": "cancelled", "reason": "x"},
                           headers=ALICE)
    assert r.json()["status"] == "cancelled"
    r = await client.post(f"/api/v1/tasks/{tid}/requeue", headers=admin())
    assert (r.status_code, r.json()["status"], r.json()["retry_count"]) == (200, "pending", 0)
    await client.post("/api/v1/tasks/claim", headers=BOB)
    r = await client.post(f"/api/v1/tasks/{tid}/fail",
                          json={"error": "fatal", "retry_eligible": False}, headers=BOB)
    assert r.json()["status"] == "failed"
    r = await client.get("/api/v1/tasks?status=failed,timed_out", headers=ALICE)
    assert [t["task_id"] for t in r.json()] == [tid]


async def test_cancel_while_running_then_late_complete_is_409(client: httpx.AsyncClient) -> None:
    await register(client, "bob")
    tid = (await create(client))["task_id"]
    await client.post("/api/v1/tasks/claim", headers=BOB)
    await client.post(f"/api/v1/tasks/{tid}/start", headers=BOB)
    r = await client.patch(f"/api/v1/tasks/{tid}", json={"status": "cancelled"}, headers=ALICE)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = await client.post(f"/api/v1/tasks/{tid}/complete", json={"result": 1}, headers=BOB)
    assert r.status_code == 409
    assert r.json()["detail"]["status"] == "cancelled"


async def test_requester_resolves_and_admin_acts_on_any_task(client: httpx.AsyncClient) -> None:
    await register(client, "bob")
    tid = (await create(client))["task_id"]
    await client.post("/api/v1/tasks/claim", headers=BOB)
    r = await client.post(f"/api/v1/tasks/{tid}/complete", json={"result": "by hand"},
                          headers=ALICE)
    assert r.status_code == 200 and r.json()["result"] == "by hand"
    other = (await create(client))["task_id"]
    r = await client.patch(f"/api/v1/tasks/{other}", json={"context": {"k": 1}},
                           headers=agent("carol"))
    assert r.status_code == 403
    r = await client.patch(f"/api/v1/tasks/{other}", json={"context": {"k": 1}},
                           headers=admin("carol"))
    assert r.status_code == 200 and r.json()["metadata"] == {"k": 1}
    r = await client.patch(f"/api/v1/tasks/{other}", json={"status": "cancelled"},
                           headers=admin("carol"))
    assert r.json()["status"] == "cancelled"


async def test_patch_merges_metadata_and_changes_priority(client: httpx.AsyncClient) -> None:
    tid = (await create(client, metadata={"a": 1, "b": {"c": 2}}))["task_id"]
    r = await client.patch(f"/api/v1/tasks/{tid}",
                           json={"metadata": {"a": None, "b": {"d": 3}}, "priority": 9},
                           headers=ALICE)
    assert r.status_code == 200
    assert r.json()["metadata"] == {"b": {"c": 2, "d": 3}}
    assert r.json()["priority"] == 9


async def test_list_filters(client: httpx.AsyncClient) -> None:
    parent = (await create(client, title="parent", scope="design"))["task_id"]
    code = (await create(client, scope="code", parent_task_id=parent, source="ci"))["task_id"]
    by_bob = (await create(client, headers=BOB, owner="team", scope="design"))["task_id"]
    await client.put("/api/v1/agents/worker", json={"capabilities": ["code"]},
                     headers=agent("worker"))
    r = await client.post("/api/v1/tasks/claim", json={"capabilities": ["code"]},
                          headers=agent("worker"))
    assert r.json()["task_id"] == code

    async def ids(query: str) -> set[str]:
        r = await client.get(f"/api/v1/tasks?{query}", headers=ALICE)
        assert r.status_code == 200, r.text
        return {t["task_id"] for t in r.json()}

    assert await ids("status=assigned") == {code}
    assert await ids("status=pending,assigned") == {parent, code, by_bob}
    assert await ids("requester=bob") == {by_bob}
    assert await ids("owner=team") == {by_bob}
    assert await ids("assignee=worker") == {code}
    assert await ids("agent=worker") == {code}
    assert await ids("scope=code") == {code}
    assert await ids("scope=design") == {parent, by_bob}
    assert await ids("capability=CODE") == {code}
    assert await ids("source=ci") == {code}
    assert await ids(f"parent_task_id={parent}") == {code}


async def test_pagination_follows_the_cursor_in_listing_order(client: httpx.AsyncClient) -> None:
    created = [(await create(client, priority=p % 3))["task_id"] for p in range(7)]
    full = await client.get("/api/v1/tasks?limit=500", headers=ALICE)
    assert "x-next-cursor" not in full.headers
    expected = [t["task_id"] for t in full.json()]
    assert sorted(expected) == sorted(created)
    assert [t["priority"] for t in full.json()] == sorted(
        (t["priority"] for t in full.json()), reverse=True
    )
    seen: list[str] = []
    url = "/api/v1/tasks?limit=3"
    pages = 0
    while True:
        r = await client.get(url, headers=ALICE)
        seen += [t["task_id"] for t in r.json()]
        pages += 1
        cursor = r.headers.get("x-next-cursor")
        if cursor is None:
            break
        url = f"/api/v1/tasks?limit=3&cursor={cursor}"
    assert seen == expected and pages == 3


async def test_agents_directory_and_admin_endpoints(client: httpx.AsyncClient) -> None:
    r = await client.put("/api/v1/agents/bob",
                         json={"capabilities": ["Code", "code", " review "], "max_concurrent": 2},
                         headers=BOB)
    assert r.status_code == 200
    assert sorted(r.json()["capabilities"]) == ["code", "review"]
    r = await client.put("/api/v1/agents/bob", json={"owner": "team"}, headers=admin())
    assert r.status_code == 200 and r.json()["owner"] == "team"
    r = await client.put("/api/v1/agents/carol", json={"status": "sleeping"}, headers=admin())
    assert r.status_code == 200 and r.json()["status"] == "sleeping"
    r = await client.post("/api/v1/agents/bob/heartbeat", json={"status": "busy"}, headers=BOB)
    assert r.status_code == 200 and r.json()["status"] == "busy"
    r = await client.post("/api/v1/agents/bob/drain", headers=admin())
    assert r.json()["drained"] is True
    await create(client)
    r = await client.post("/api/v1/tasks/claim", headers=BOB)
    assert r.status_code == 204  # a drained agent gets no new work
    r = await client.post("/api/v1/agents/bob/undrain", headers=admin())
    assert r.json()["drained"] is False
    r = await client.get("/api/v1/agents", headers=admin())
    agents = {a["agent_id"]: a for a in r.json()}
    assert set(agents) == {"bob", "carol"}
    assert agents["bob"]["max_concurrent"] == 2 and agents["bob"]["active_tasks"] == 0
    for key in ("capabilities", "status", "policy", "owner", "drained", "source"):
        assert key in agents["bob"]
    r = await client.get("/api/v1/stats", headers=admin())
    stats = r.json()
    assert stats["queue"]["pending"] == 1
    for key in ("oldest_pending_seconds", "avg_completion_ms", "wait_ms_p50", "wait_ms_p95",
                "completed_last_hour", "failed_last_hour", "dead_letter"):
        assert key in stats


async def test_explain_lists_candidates_or_says_not_implemented(
    client: httpx.AsyncClient,
) -> None:
    tid = (await create(client, scope="code"))["task_id"]
    await client.put("/api/v1/agents/bob", json={"capabilities": ["code"]}, headers=BOB)
    r = await client.get(f"/api/v1/tasks/{tid}/explain", headers=admin())
    if r.status_code == 501:  # before the assignment engine provides Broker.explain
        assert r.json()["error"]
        return
    assert r.status_code == 200
    assert r.json()["task_id"] == tid
    assert "bob" in [c["agent_id"] for c in r.json()["candidates"]]


async def test_explain_names_the_holder_of_a_running_task_and_why_it_has_it(
    client: httpx.AsyncClient, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    """An agent at its limit because of the very task it holds is not "at its limit" for it:
    explain says who holds the task, since when, how it got it (a claim, or the assigner's
    choice with its score)."""
    for name in ("bob", "carol"):
        r = await client.put(f"/api/v1/agents/{name}", headers=agent(name),
                             json={"capabilities": ["code"], "max_concurrent": 1})
        assert r.status_code == 200
    claimed = (await create(client, scope="code"))["task_id"]
    r = await client.post("/api/v1/tasks/claim", headers=BOB, json={"start": True})
    assert r.status_code == 200 and r.json()["task_id"] == claimed
    pushed = (await create(client, scope="code"))["task_id"]
    given = sql.execute("SELECT task_id, agent_id, score FROM dispatch.task_assign(10)").fetchall()
    assert [(str(g["task_id"]), g["agent_id"]) for g in given] == [(pushed, "carol")]

    r = await client.get(f"/api/v1/tasks/{claimed}/explain", headers=admin())
    assert r.status_code == 200
    body = r.json()
    assert body["holder"]["agent_id"] == "bob" and body["holder"]["how"] == "claimed"
    assert body["holder"]["attempt"] == 1 and body["holder"]["lease"] is not None
    bob = body["candidates"][0]
    assert bob["agent_id"] == "bob" and bob["holder"] is True
    assert not any("limit" in reason for reason in bob["reasons"]), bob["reasons"]
    # Carol is full with her own task: that reason stays hers.
    carol = next(c for c in body["candidates"] if c["agent_id"] == "carol")
    assert carol["holder"] is False and any("limit" in x for x in carol["reasons"])

    body = (await client.get(f"/api/v1/tasks/{pushed}/explain", headers=admin())).json()
    assert body["holder"]["agent_id"] == "carol" and body["holder"]["how"] == "assigned"
    assert body["holder"]["score"] == pytest.approx(given[0]["score"], rel=1e-3)
    assert any(n.startswith("carol holds it: the assigner chose it") for n in body["notes"])

    # A pending task has no holder.
    waiting = (await create(client, scope="code"))["task_id"]
    body = (await client.get(f"/api/v1/tasks/{waiting}/explain", headers=admin())).json()
    assert body["holder"] is None and not any(c["holder"] for c in body["candidates"])


async def test_openapi_document_is_served(client: httpx.AsyncClient) -> None:
    r = await client.get("/schema/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    assert "/api/v1/tasks" in paths and "/api/v1/tasks/{task_id}/complete" in paths
    assert r.json()["components"]["securitySchemes"]["BearerToken"]["scheme"] == "bearer"


async def test_the_root_points_to_the_dashboard_and_the_docs(broker: Broker) -> None:
    settings = Settings(server=ServerSettings(admin_token="t"))
    async with AsyncTestClient(app=web_app(settings, broker)) as c:
        r = await c.get("/", headers={"Accept": "application/json"})
        assert r.status_code == 200
        links = r.json()
        assert (links["dashboard"], links["docs"], links["openapi"]) == (
            "/ui", "/schema/swagger", "/schema/openapi.json")
        for path in ("/ui/login", "/schema/swagger", "/schema/openapi.json"):
            assert (await c.get(path)).status_code == 200, path
        page = await c.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
        assert page.headers["content-type"].startswith("text/html")
        assert 'href="/ui"' in page.text and 'href="/schema/swagger"' in page.text
    without_ui = Settings(ui=UiSettings(enabled=False))
    async with AsyncTestClient(app=web_app(without_ui, broker)) as c:
        assert "dashboard" not in (await c.get("/")).json()
