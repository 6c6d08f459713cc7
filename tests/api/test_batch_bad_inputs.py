"""Hostile content inside a batch of reports: a clear 400, and nothing changes."""

from __future__ import annotations

from typing import Any

import httpx
import psycopg

from tests.api.conftest import agent, counts, register
from tests.api.test_tasks_api import create

BOB = agent("bob")


async def test_unstorable_content_in_a_report_is_400_and_changes_nothing(
    client: httpx.AsyncClient, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    await register(client, "bob")
    task = await create(client)
    await client.post("/api/v1/tasks/claim", json={}, headers=BOB)
    before = counts(sql)
    tid = task["task_id"]
    for report in (
        {"task_id": tid, "action": "progress", "data": {"k": "a\u0000b"}},
        {"task_id": tid, "action": "complete", "result": {"k": "a\u0000b"}},
        {"task_id": tid, "action": "progress", "detail": "a\u0000b"},
        {"task_id": tid, "action": "progress", "percent": 1e300},
    ):
        r = await client.post("/api/v1/tasks/reports", json=[report], headers=BOB)
        assert r.status_code == 400, (report, r.status_code, r.text)
    assert counts(sql) == before
    r = await client.get(f"/api/v1/tasks/{tid}", headers=BOB)
    assert r.json()["status"] == "assigned"
