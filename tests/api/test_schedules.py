"""The schedules API as an operator meets it: create, read, change, pause, run now, delete, and
every refusal a 400 (naming the field), 401/403, 404 or 409 that writes nothing."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest

from tests.api.conftest import admin, agent

ADMIN = admin()
Sql = psycopg.Connection[dict[str, Any]]
BASE = "/api/v1/schedules"


def body(name: str = "nightly", **fields: Any) -> dict[str, Any]:
    return {"name": name, "cron": "0 3 * * *", "timezone": "Europe/Berlin",
            "template": {"title": "reindex", "required_capabilities": ["code"]}, **fields}


def rows(sql: Sql) -> int:
    row = sql.execute("SELECT count(*) AS n FROM dispatch.schedules").fetchone()
    assert row is not None
    return int(row["n"])


async def test_create_read_change_and_delete(client: httpx.AsyncClient, sql: Sql) -> None:
    r = await client.post(BASE, json=body(), headers=ADMIN)
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["overlap"] == "skip" and made["catch_up"] == "latest" and not made["paused"]
    assert made["template"] == {"title": "reindex", "description": "",
                                "required_capabilities": ["code"], "priority": 0,
                                "max_retries": 3, "metadata": {}, "cost": 1}
    nxt = datetime.fromisoformat(made["next_fire_at"])
    assert nxt > datetime.now(UTC)
    assert nxt.astimezone(UTC).hour in (1, 2)  # 03:00 in Berlin (CET or CEST)
    assert (await client.get(f"{BASE}/nightly", headers=ADMIN)).json()["name"] == "nightly"
    assert [s["name"] for s in (await client.get(BASE, headers=ADMIN)).json()] == ["nightly"]

    # Minutes 5, 15, ..., 55 of an hour twelve hours from now: never the old timing's 03:00 in
    # Berlin, and never while the test runs (it would fire and count one more).
    far = (datetime.now(UTC).hour + 12) % 24
    r = await client.patch(f"{BASE}/nightly", json={"cron": f"5-59/10 {far} * * *",
                                                    "timezone": "UTC"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    changed = datetime.fromisoformat(r.json()["next_fire_at"])
    assert changed.minute % 10 == 5 and changed != nxt  # the new timing, from now on

    r = await client.post(f"{BASE}/nightly/pause", headers=ADMIN)
    assert r.status_code == 200 and r.json()["paused"] is True
    r = await client.post(f"{BASE}/nightly/resume", headers=ADMIN)
    assert r.status_code == 200 and r.json()["paused"] is False
    assert r.json()["next_fire_at"] is not None

    r = await client.post(f"{BASE}/nightly/run", headers=ADMIN)
    assert r.status_code == 201, r.text
    task = r.json()
    assert task["title"] == "reindex" and task["required_capabilities"] == ["code"]
    assert task["source"] == "schedule" and task["metadata"]["schedule"] == "nightly"
    listed = (await client.get(f"{BASE}/nightly/tasks", headers=ADMIN)).json()
    assert [t["task_id"] for t in listed] == [task["task_id"]]
    assert (await client.get(f"{BASE}/nightly", headers=ADMIN)).json()["fired_count"] == 1
    fired = [e for e in (await client.get(f"/api/v1/tasks/{task['task_id']}/events",
                                          headers=ADMIN)).json() if e["event"] == "schedule_fired"]
    assert fired[0]["actor"] == "ops" and fired[0]["payload"]["run_now"] is True

    assert (await client.delete(f"{BASE}/nightly", headers=ADMIN)).status_code == 204
    assert (await client.get(f"{BASE}/nightly", headers=ADMIN)).status_code == 404
    # The tasks it made stay.
    assert (await client.get(f"/api/v1/tasks/{task['task_id']}", headers=ADMIN)).status_code == 200


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"cron": "61 * * * *"}, "cron"),
        ({"cron": "* * *"}, "cron"),
        ({"cron": "0 0 31 2 *"}, "cron"),
        ({"cron": "@reboot"}, "cron"),
        ({"timezone": "Mars/Olympus_Mons"}, "timezone"),
        ({"timezone": "../../etc/passwd"}, "timezone"),
        ({"name": "has space"}, "name"),
        ({"name": "a.b"}, "name"),
        ({"overlap": "queue"}, "overlap"),
        ({"catch_up": "some"}, "catch_up"),
        ({"catch_up_limit": 0}, "catch_up_limit"),
        ({"template": {"title": "x", "priority": 99}}, "template.priority"),
        ({"template": {"title": ""}}, "template.title"),
        ({"template": {"description": "no title"}}, "template.title"),
        ({"template": {"title": "x", "colour": "red"}}, "template.colour"),
        ({"template": {"title": "x", "available_at": "2030-01-01T00:00:00Z"}},
         "template.available_at"),
        ({"template": {"title": "x", "source": "cron"}}, "template.source"),
        ({"template": {"title": "x", "parent_task_id": "00000000-0000-0000-0000-000000000001"}},
         "template.parent_task_id"),
        ({"template": {"title": "x", "scope": "a", "required_capabilities": ["b"]}},
         "template.scope"),
    ],
)
async def test_bad_input_is_a_400_naming_the_field_and_writes_nothing(
    client: httpx.AsyncClient, sql: Sql, change: dict[str, Any], field: str
) -> None:
    r = await client.post(BASE, json=body(**change), headers=ADMIN)
    assert r.status_code == 400, r.text
    detail = r.json().get("detail")
    named = detail.get("field") if isinstance(detail, dict) else None
    assert named == field or field in r.json()["error"], r.json()
    assert rows(sql) == 0
    assert sql.execute("SELECT count(*) AS n FROM dispatch.tasks").fetchone() == {"n": 0}


async def test_a_bad_change_is_a_400_and_keeps_the_schedule(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    assert (await client.post(BASE, json=body(), headers=ADMIN)).status_code == 201
    before = (await client.get(f"{BASE}/nightly", headers=ADMIN)).json()
    for change in ({"cron": "0 25 * * *"}, {"timezone": "Nowhere/Land"},
                   {"template": {"title": "x", "max_retries": -1}}, {"paused": "yes"}):
        r = await client.patch(f"{BASE}/nightly", json=change, headers=ADMIN)
        assert r.status_code == 400, (change, r.text)
    assert (await client.get(f"{BASE}/nightly", headers=ADMIN)).json() == before


async def test_names_are_unique_and_unknown_names_are_404(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    assert (await client.post(BASE, json=body(), headers=ADMIN)).status_code == 201
    r = await client.post(BASE, json=body(cron="* * * * *"), headers=ADMIN)
    assert r.status_code == 409
    assert (await client.get(f"{BASE}/nightly", headers=ADMIN)).json()["cron"] == "0 3 * * *"
    for method, path in (("GET", "absent"), ("PATCH", "absent"), ("DELETE", "absent"),
                         ("POST", "absent/pause"), ("POST", "absent/resume"),
                         ("POST", "absent/run"), ("GET", "absent/tasks")):
        kwargs: dict[str, Any] = {"json": {"paused": True}} if method == "PATCH" else {}
        r = await client.request(method, f"{BASE}/{path}", headers=ADMIN, **kwargs)
        assert r.status_code == 404, (method, path, r.status_code)


async def test_only_an_admin_may_touch_schedules(client: httpx.AsyncClient, sql: Sql) -> None:
    r = await client.post(BASE, json=body(), headers=agent("alice"))
    assert r.status_code in (401, 403)
    assert (await client.get(BASE, headers=agent("alice"))).status_code in (401, 403)
    assert rows(sql) == 0


async def test_no_client_creates_under_a_schedule_s_name(
    client: httpx.AsyncClient, sql: Sql
) -> None:
    """A fire's task is keyed by requester schedule:<name> and idempotency key fire:<time>; a
    client sending that X-Agent-ID (as anyone may in open auth mode, or an admin) could make the
    task of a fire to come, which the fire would then take for its own."""
    for headers in (agent("schedule:nightly"), admin("schedule:nightly")):
        r = await client.post("/api/v1/tasks", json={"title": "not a fire"},
                              headers={**headers, "Idempotency-Key": "fire:2030-01-01T03:00:00Z"})
        assert r.status_code == 403, r.text
        assert "schedule:" in r.json()["error"]
    left = sql.execute("SELECT count(*) AS n FROM dispatch.tasks").fetchone()
    assert left == {"n": 0}


async def test_seconds_and_aliases_are_accepted(client: httpx.AsyncClient) -> None:
    r = await client.post(BASE, json=body("often", cron="* * * * * */5", timezone="UTC"),
                          headers=ADMIN)
    assert r.status_code == 201, r.text
    nxt = datetime.fromisoformat(r.json()["next_fire_at"])
    assert nxt.second % 5 == 0 and (nxt - datetime.now(UTC)).total_seconds() <= 6
    r = await client.post(BASE, json=body("hourly", cron="@hourly"), headers=ADMIN)
    assert r.status_code == 201, r.text
    assert datetime.fromisoformat(r.json()["next_fire_at"]).minute == 0
