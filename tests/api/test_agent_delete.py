"""DELETE /api/v1/agents/{id}: an agent registered by mistake goes, with its tokens; one that
holds work stays (409 naming the tasks)."""

from __future__ import annotations

from typing import Any

import httpx
import psycopg

from tests.api.conftest import admin, agent, counts, register

BOB = agent("bob")


async def test_an_agent_removes_itself_and_its_tokens_stop_working(
    client: httpx.AsyncClient, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    await register(client, "bob", capabilities=["code"])
    r = await client.post("/api/v1/agents/bob/tokens", headers=admin())
    token = r.json()["token"]
    signed = {**BOB, "Authorization": f"Bearer {token}"}
    assert (await client.get("/api/v1/tasks", headers=signed)).status_code == 200
    r = await client.delete("/api/v1/agents/bob", headers=BOB)
    assert r.status_code == 204, r.text
    agents = (await client.get("/api/v1/agents", headers=admin())).json()
    assert "bob" not in {a["agent_id"] for a in agents}
    assert (await client.get("/api/v1/tasks", headers=signed)).status_code == 403
    assert sql.execute("SELECT count(*) AS n FROM dispatch.agent_tokens").fetchone() == {"n": 0}
    # A task created meanwhile is not pushed to it: nobody can take it.
    r = await client.post("/api/v1/tasks", json={"title": "t", "scope": "code"}, headers=BOB)
    assert r.status_code == 201
    assert (await client.delete("/api/v1/agents/bob", headers=BOB)).status_code == 404


async def test_an_agent_with_active_tasks_stays_and_the_409_names_them(
    client: httpx.AsyncClient, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    await register(client, "bob")
    r = await client.post("/api/v1/tasks", json={"title": "held"}, headers=agent("alice"))
    task_id = r.json()["task_id"]
    assert (await client.post("/api/v1/tasks/claim", headers=BOB)).status_code == 200
    before = counts(sql)
    r = await client.delete("/api/v1/agents/bob", headers=admin())
    assert r.status_code == 409, r.text
    assert task_id in r.json()["error"] and "1 active task" in r.json()["error"]
    assert counts(sql) == before
    r = await client.post(f"/api/v1/tasks/{task_id}/complete", headers=BOB)
    assert r.status_code == 200
    assert (await client.delete("/api/v1/agents/bob", headers=admin())).status_code == 204


async def test_only_the_agent_itself_or_an_admin_may_remove_it(
    client: httpx.AsyncClient, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    await register(client, "bob")
    before = counts(sql)
    r = await client.delete("/api/v1/agents/bob", headers=agent("mallory"))
    assert r.status_code == 403, r.text
    assert (await client.delete("/api/v1/agents/nobody", headers=admin())).status_code == 404
    assert (await client.delete("/api/v1/agents/..", headers=admin())).status_code in (400, 404)
    assert counts(sql) == before
