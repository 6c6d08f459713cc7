"""Bad input never produces a 500 and never changes the database: one table, each row a request
and the status it must get, checked against a fingerprint of every table before and after."""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
import pytest

from tests.api.conftest import ADMIN_TOKEN, MAX_BODY, admin, agent, register

UNKNOWN = str(uuid.uuid4())
ALICE = agent("alice")
BOB = agent("bob")
MALLORY = agent("mallory")


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str  # {pending}, {running}, {done} and {unknown} are task ids
    status: int
    headers: dict[str, str] = field(default_factory=lambda: dict(ALICE))
    json: Any = None
    content: bytes | None = None


def _title(n: int) -> dict[str, Any]:
    return {"title": "x" * n}


CASES = [
    # -- missing or wrong headers --------------------------------------------------------------
    Case("no X-Agent-ID", "GET", "/api/v1/tasks", 401, headers={}),
    Case("no X-Agent-ID on create", "POST", "/api/v1/tasks", 401, headers={}, json={"title": "t"}),
    Case("empty X-Agent-ID", "GET", "/api/v1/tasks", 401, headers={"X-Agent-ID": ""}),
    Case("X-Agent-ID with a space", "GET", "/api/v1/tasks", 401, headers={"X-Agent-ID": "a b"}),
    Case("X-Agent-ID of 129 chars", "GET", "/api/v1/tasks", 401, headers=agent("a" * 129)),
    Case("X-Agent-ID missing, bad body too", "POST", "/api/v1/tasks", 401, headers={},
         content=b"{"),
    Case("stats without a token", "GET", "/api/v1/stats", 401),
    Case("stats with a wrong token", "GET", "/api/v1/stats", 403,
         headers={**ALICE, "Authorization": "Bearer nope"}),
    Case("stats with Basic auth", "GET", "/api/v1/stats", 401,
         headers={**ALICE, "Authorization": "Basic YTpi"}),
    Case("stats with an empty Bearer", "GET", "/api/v1/stats", 401,
         headers={**ALICE, "Authorization": "Bearer "}),
    Case("agents list without a token", "GET", "/api/v1/agents", 401),
    Case("drain without a token", "POST", "/api/v1/agents/bob/drain", 401),
    Case("requeue with a wrong token", "POST", "/api/v1/tasks/{done}/requeue", 403,
         headers={**ALICE, "Authorization": "Bearer " + ADMIN_TOKEN + "x"}),
    Case("explain without a token", "GET", "/api/v1/tasks/{pending}/explain", 401),
    Case("cancel with a wrong token", "PATCH", "/api/v1/tasks/{pending}", 403,
         headers={**MALLORY, "Authorization": "Bearer wrong"}, json={"status": "cancelled"}),
    Case("create with a wrong admin token", "POST", "/api/v1/tasks", 403,
         headers={**ALICE, "Authorization": "Bearer nope"}, json={"title": "t"}),
    Case("Idempotency-Key of 201 chars", "POST", "/api/v1/tasks", 400,
         headers={**ALICE, "Idempotency-Key": "k" * 201}, json={"title": "t"}),
    # -- malformed bodies ----------------------------------------------------------------------
    Case("malformed JSON", "POST", "/api/v1/tasks", 400, content=b'{"title": '),
    Case("not JSON at all", "POST", "/api/v1/tasks", 400, content=b"title=x"),
    Case("empty body on create", "POST", "/api/v1/tasks", 400, content=b""),
    Case("array body", "POST", "/api/v1/tasks", 400, json=[{"title": "t"}]),
    Case("lone surrogate", "POST", "/api/v1/tasks", 400, content=b'{"title": "\\ud800"}'),
    Case("NUL in title", "POST", "/api/v1/tasks", 400, json={"title": "a\x00b"}),
    Case("NUL in metadata", "POST", "/api/v1/tasks", 400,
         json={"title": "t", "metadata": {"k": "a\x00b"}}),
    Case("oversized body", "POST", "/api/v1/tasks", 413,
         json={"title": "t", "description": "d" * (MAX_BODY + 1)}),
    Case("oversized progress", "POST", "/api/v1/tasks/{running}/progress", 413,
         headers=BOB, json={"data": "d" * (MAX_BODY + 1)}),
    Case("JSON nested 5000 deep", "POST", "/api/v1/tasks", 400,
         content=b'{"title": "t", "metadata": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}"),
    Case("merge patch nested 33 deep", "PATCH", "/api/v1/tasks/{pending}", 400,
         json={"metadata": functools.reduce(lambda v, _: {"k": v}, range(33), 1)}),
    # -- wrong types, unknown fields, out-of-range numbers --------------------------------------
    Case("title is a number", "POST", "/api/v1/tasks", 400, json={"title": 5}),
    Case("title missing", "POST", "/api/v1/tasks", 400, json={"priority": 1}),
    Case("title empty", "POST", "/api/v1/tasks", 400, json=_title(0)),
    Case("title 501 chars", "POST", "/api/v1/tasks", 400, json=_title(501)),
    Case("unknown field", "POST", "/api/v1/tasks", 400, json={"title": "t", "colour": "red"}),
    Case("priority 11", "POST", "/api/v1/tasks", 400, json={"title": "t", "priority": 11}),
    Case("priority -1", "POST", "/api/v1/tasks", 400, json={"title": "t", "priority": -1}),
    Case("priority 1.5", "POST", "/api/v1/tasks", 400, json={"title": "t", "priority": 1.5}),
    Case("priority as text", "POST", "/api/v1/tasks", 400, json={"title": "t", "priority": "hi"}),
    Case("priority true", "POST", "/api/v1/tasks", 400, json={"title": "t", "priority": True}),
    Case("max_retries 101", "POST", "/api/v1/tasks", 400, json={"title": "t", "max_retries": 101}),
    Case("timeout_seconds 0", "POST", "/api/v1/tasks", 400,
         json={"title": "t", "timeout_seconds": 0}),
    Case("timeout_seconds 2^40", "POST", "/api/v1/tasks", 400,
         json={"title": "t", "timeout_seconds": 2**40}),
    Case("heartbeat_seconds -5", "POST", "/api/v1/tasks", 400,
         json={"title": "t", "heartbeat_seconds": -5}),
    Case("huge integer", "POST", "/api/v1/tasks", 400, json={"title": "t", "priority": 10**30}),
    Case("capabilities not a list", "POST", "/api/v1/tasks", 400,
         json={"title": "t", "required_capabilities": "code"}),
    Case("empty capability", "POST", "/api/v1/tasks", 400,
         json={"title": "t", "required_capabilities": [""]}),
    Case("scope and required_capabilities", "POST", "/api/v1/tasks", 400,
         json={"title": "t", "scope": "a", "required_capabilities": ["b"]}),
    Case("metadata and context", "POST", "/api/v1/tasks", 400,
         json={"title": "t", "metadata": {}, "context": {}}),
    Case("metadata not an object", "POST", "/api/v1/tasks", 400,
         json={"title": "t", "metadata": [1, 2]}),
    Case("available_at without a zone", "POST", "/api/v1/tasks", 400,
         json={"title": "t", "available_at": "2030-01-01T00:00:00"}),
    Case("available_at not a date", "POST", "/api/v1/tasks", 400,
         json={"title": "t", "available_at": "tomorrow"}),
    Case("wait_seconds 31", "POST", "/api/v1/tasks/claim", 400, json={"wait_seconds": 31}),
    Case("wait_seconds -1", "POST", "/api/v1/tasks/claim", 400, json={"wait_seconds": -1}),
    Case("claim capabilities as object", "POST", "/api/v1/tasks/claim", 400,
         json={"capabilities": {"a": 1}}),
    Case("percent 101", "POST", "/api/v1/tasks/{running}/progress", 400, headers=BOB,
         json={"percent": 101}),
    Case("percent as text", "POST", "/api/v1/tasks/{running}/progress", 400, headers=BOB,
         json={"percent": "half"}),
    Case("retry_eligible as text", "POST", "/api/v1/tasks/{running}/fail", 400, headers=BOB,
         json={"retry_eligible": "no"}),
    Case("unknown field on complete", "POST", "/api/v1/tasks/{running}/complete", 400,
         headers=BOB, json={"result": {}, "status": "completed"}),
    Case("PATCH with nothing", "PATCH", "/api/v1/tasks/{pending}", 400, json={}),
    Case("PATCH to another status", "PATCH", "/api/v1/tasks/{pending}", 400,
         json={"status": "completed"}),
    Case("PATCH priority 42", "PATCH", "/api/v1/tasks/{pending}", 400, json={"priority": 42}),
    Case("PATCH reason alone", "PATCH", "/api/v1/tasks/{pending}", 400, json={"reason": "why"}),
    Case("agent max_concurrent 0", "PUT", "/api/v1/agents/alice", 400,
         json={"max_concurrent": 0}),
    Case("agent status sleepy", "PUT", "/api/v1/agents/alice", 400, json={"status": "sleepy"}),
    Case("heartbeat status bogus", "POST", "/api/v1/agents/bob/heartbeat", 400, headers=BOB,
         json={"status": "bogus"}),
    # -- bad query parameters ------------------------------------------------------------------
    Case("limit 0", "GET", "/api/v1/tasks?limit=0", 400),
    Case("limit 501", "GET", "/api/v1/tasks?limit=501", 400),
    Case("limit abc", "GET", "/api/v1/tasks?limit=abc", 400),
    Case("unknown status filter", "GET", "/api/v1/tasks?status=pending,bogus", 400),
    Case("assignee and agent", "GET", "/api/v1/tasks?assignee=a&agent=b", 400),
    Case("cursor not base64", "GET", "/api/v1/tasks?cursor=!!!", 400),
    Case("cursor of garbage", "GET", "/api/v1/tasks?cursor=eyJhIjoxfQ", 400),
    Case("parent filter not a UUID", "GET", "/api/v1/tasks?parent_task_id=xyz", 400),
    Case("NUL in a filter", "GET", "/api/v1/tasks?requester=a%00b", 400),
    # -- bad UUIDs and unknown ids -------------------------------------------------------------
    Case("task id not a UUID", "GET", "/api/v1/tasks/not-a-uuid", 400),
    Case("task id too short", "POST", "/api/v1/tasks/1234/start", 400, headers=BOB),
    Case("parent_task_id not a UUID", "POST", "/api/v1/tasks", 400,
         json={"title": "t", "parent_task_id": "12345"}),
    Case("parent_task_id unknown", "POST", "/api/v1/tasks", 400,
         json={"title": "t", "parent_task_id": UNKNOWN}),
    Case("unknown task", "GET", "/api/v1/tasks/{unknown}", 404),
    Case("events of an unknown task", "GET", "/api/v1/tasks/{unknown}/events", 404),
    Case("complete an unknown task", "POST", "/api/v1/tasks/{unknown}/complete", 404, json={}),
    Case("explain an unknown task", "GET", "/api/v1/tasks/{unknown}/explain", 404,
         headers=admin()),
    Case("heartbeat of an unknown agent", "POST", "/api/v1/agents/ghost/heartbeat", 404,
         headers=agent("ghost")),
    Case("drain an unknown agent", "POST", "/api/v1/agents/ghost/drain", 404, headers=admin()),
    Case("agent id with a space", "PUT", "/api/v1/agents/a%20b", 400, headers=admin(), json={}),
    Case("unknown route", "GET", "/api/v1/nothing-here", 404),
    Case("method not allowed", "DELETE", "/api/v1/tasks/{pending}", 405),
    # -- who may do what -----------------------------------------------------------------------
    Case("cancel by a stranger", "PATCH", "/api/v1/tasks/{pending}", 403, headers=MALLORY,
         json={"status": "cancelled"}),
    Case("patch metadata by a stranger", "PATCH", "/api/v1/tasks/{pending}", 403,
         headers=MALLORY, json={"metadata": {"a": 1}}),
    Case("start by a stranger", "POST", "/api/v1/tasks/{running}/start", 403, headers=MALLORY),
    Case("progress by a stranger", "POST", "/api/v1/tasks/{running}/progress", 403,
         headers=MALLORY, json={"percent": 5}),
    Case("complete by a stranger", "POST", "/api/v1/tasks/{running}/complete", 403,
         headers=MALLORY, json={}),
    Case("fail by a stranger", "POST", "/api/v1/tasks/{running}/fail", 403, headers=MALLORY,
         json={"error": "x"}),
    Case("register another agent", "PUT", "/api/v1/agents/bob", 403, headers=MALLORY, json={}),
    Case("heartbeat for another agent", "POST", "/api/v1/agents/bob/heartbeat", 403,
         headers=MALLORY),
    # -- illegal state changes -----------------------------------------------------------------
    Case("cancel a completed task", "PATCH", "/api/v1/tasks/{done}", 409,
         json={"status": "cancelled"}),
    Case("complete a completed task (requester)", "POST", "/api/v1/tasks/{done}/complete", 409,
         json={"result": {}}),
    Case("fail a completed task", "POST", "/api/v1/tasks/{done}/fail", 409, headers=BOB,
         json={"error": "late"}),
    Case("start a completed task", "POST", "/api/v1/tasks/{done}/start", 409, headers=BOB),
    Case("progress on a completed task", "POST", "/api/v1/tasks/{done}/progress", 409,
         headers=BOB, json={"percent": 50}),
    Case("priority of a running task", "PATCH", "/api/v1/tasks/{running}", 409,
         json={"priority": 5}),
    Case("requeue a pending task", "POST", "/api/v1/tasks/{pending}/requeue", 409,
         headers=admin()),
    Case("requeue a running task", "POST", "/api/v1/tasks/{running}/requeue", 409,
         headers=admin()),
    Case("cancel and re-prioritise", "PATCH", "/api/v1/tasks/{pending}", 400,
         json={"status": "cancelled", "priority": 3}),
]


@pytest.fixture
async def world(client: httpx.AsyncClient) -> dict[str, str]:
    """A pending, a running and a completed task of alice's; bob runs the others."""
    await register(client, "bob")
    ids = {}
    for name in ("done", "running"):
        r = await client.post("/api/v1/tasks", json={"title": name}, headers=ALICE)
        ids[name] = r.json()["task_id"]
        r = await client.post("/api/v1/tasks/claim", json={}, headers=BOB)
        assert r.json()["task_id"] == ids[name]
        r = await client.post(f"/api/v1/tasks/{ids[name]}/start", headers=BOB)
        assert r.status_code == 200
    r = await client.post(f"/api/v1/tasks/{ids['done']}/complete", json={}, headers=BOB)
    assert r.json()["status"] == "completed"
    r = await client.post("/api/v1/tasks", json={"title": "pending"}, headers=ALICE)
    ids["pending"] = r.json()["task_id"]
    ids["unknown"] = UNKNOWN
    return ids


def fingerprint(sql: psycopg.Connection[dict[str, Any]]) -> dict[str, Any]:
    """Row counts and a digest of every row of the tables a request could change."""
    row = sql.execute(
        """
        SELECT (SELECT count(*) FROM dispatch.tasks) AS tasks,
               (SELECT count(*) FROM dispatch.task_events) AS events,
               (SELECT count(*) FROM dispatch.agents) AS agents,
               (SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY task_id), ''))
                FROM dispatch.tasks t) AS tasks_md5,
               (SELECT md5(coalesce(string_agg(e::text, '|' ORDER BY id), ''))
                FROM dispatch.task_events e) AS events_md5,
               (SELECT md5(coalesce(string_agg(a::text, '|' ORDER BY agent_id), ''))
                FROM dispatch.agents a) AS agents_md5
        """
    ).fetchone()
    assert row is not None
    return dict(row)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_bad_input_is_refused_and_changes_nothing(
    case: Case,
    client: httpx.AsyncClient,
    world: dict[str, str],
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    before = fingerprint(sql)
    headers = dict(case.headers)
    if case.content:  # raw bytes declared as JSON: what is tested is the parser's answer
        headers.setdefault("Content-Type", "application/json")
    response = await client.request(
        case.method,
        case.path.format(**world),
        headers=headers,
        json=case.json if case.content is None else None,
        content=case.content,
    )
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "detail"} and body["error"]
    if case.status == 409:
        assert body["detail"]["task_id"] in world.values()  # the current task, to resync
    if case.status == 400:
        assert "ParamType" not in body["error"]
    assert fingerprint(sql) == before


@pytest.mark.parametrize(("path", "body", "hint"), [
    ("/api/v1/tasks", {"title": "t", "capabilities": ["code"]}, "required_capabilities"),
    ("/api/v1/tasks/claim", {"wait_second": 1}, "wait_seconds"),
    ("/api/v1/tasks/reports",
     [{"task_id": "5b7c0d4e-1c2d-4c9a-8f00-000000000000", "action": "complete", "reslt": 1}],
     "result"),
])
async def test_an_unknown_field_names_the_closest_one(
    client: httpx.AsyncClient, path: str, body: object, hint: str
) -> None:
    r = await client.post(path, json=body, headers={"X-Agent-ID": "alice"})
    assert r.status_code == 400
    assert r.json()["error"].endswith(f"(did you mean `{hint}`?)"), r.text


# Values of the wrong JSON type are refused, not converted: the framework's own decoding would take
# "5" for 5, 5.0 for an integer and a number of seconds for a timestamp.
WRONG_TYPES = [
    ("/api/v1/tasks", {"title": "t", "priority": "5"}, "priority"),
    ("/api/v1/tasks", {"title": "t", "priority": 5.0}, "priority"),
    ("/api/v1/tasks", {"title": "t", "max_retries": "3"}, "max_retries"),
    ("/api/v1/tasks", {"title": "t", "timeout_seconds": "10"}, "timeout_seconds"),
    ("/api/v1/tasks", {"title": "t", "cost": "2"}, "cost"),
    ("/api/v1/tasks", {"title": "t", "available_at": 1700000000}, "available_at"),
    ("/api/v1/tasks", {"title": "t", "parent_task_id": 5}, "parent_task_id"),
    ("/api/v1/tasks/claim", {"wait_seconds": "1"}, "wait_seconds"),
    ("/api/v1/tasks/claim", {"start": "true"}, "start"),
    ("/api/v1/tasks/claim", {"max_tasks": 2.0}, "max_tasks"),
]


@pytest.mark.parametrize(("path", "body", "field"), WRONG_TYPES,
                         ids=[f"{p.rsplit('/', 1)[1]}-{f}" for p, _, f in WRONG_TYPES])
async def test_a_value_of_the_wrong_type_is_refused(
    client: httpx.AsyncClient, sql: psycopg.Connection[dict[str, Any]],
    path: str, body: dict[str, Any], field: str,
) -> None:
    before = fingerprint(sql)
    r = await client.post(path, json=body, headers=ALICE)
    assert r.status_code == 400, r.text
    assert r.json()["detail"]["field"] == field, r.text
    assert "Expected" in r.json()["error"]
    assert fingerprint(sql) == before


@pytest.mark.parametrize(("method", "path", "body", "field"), [
    ("PUT", "/api/v1/agents/alice", {"max_concurrent": "7"}, "max_concurrent"),
    ("PUT", "/api/v1/limits/concurrency/k", {"max_active": "7"}, "max_active"),
    ("PUT", "/api/v1/limits/rate/k", {"capacity": "5", "refill_per_second": 1}, "capacity"),
    ("PUT", "/api/v1/tenants/acme/weight", {"weight": "2"}, "weight"),
])
async def test_an_admin_value_of_the_wrong_type_is_refused(
    client: httpx.AsyncClient, method: str, path: str, body: dict[str, Any], field: str
) -> None:
    r = await client.request(method, path, json=body, headers=admin())
    assert r.status_code == 400, r.text
    assert r.json()["detail"]["field"] == field, r.text


async def test_the_types_a_body_may_have_are_taken(client: httpx.AsyncClient) -> None:
    """What strictness must not refuse: an integer where a number may have a fraction, an RFC 3339
    timestamp with its zone, null for an optional field."""
    r = await client.post("/api/v1/tasks", headers=ALICE, json={
        "title": "t", "cost": 2, "available_at": "2030-01-01T00:00:00+02:00",
        "timeout_seconds": None, "priority": 5,
    })
    assert r.status_code == 201, r.text
    assert r.json()["available_at"].startswith("2029-12-31T22:00:00")


async def test_a_tiny_percent_is_a_percent(
    client: httpx.AsyncClient, world: dict[str, str]
) -> None:
    """Every number from 0 to 100 is a percent, however small (1e-50 underflowed a real: 400)."""
    for percent in (1e-50, 5e-324, 100.0):
        r = await client.post(f"/api/v1/tasks/{world['running']}/progress", headers=BOB,
                              json={"percent": percent})
        assert r.status_code == 200, r.text
        assert r.json()["progress"]["percent"] == percent
    r = await client.post("/api/v1/tasks/reports", headers=BOB, json=[
        {"task_id": world["running"], "action": "progress", "percent": 1e-50}])
    assert r.json()[0]["status"] == 200, r.text
