"""Poison against a real `dispatch serve`: every field that carries a timestamp or JSON, on every
endpoint that takes it, gets values that break parsers, encoders or Postgres (NUL, lone
surrogates, numbers past any range, nesting thousands deep, times no client can read back). Each
is a 4xx that changes nothing, and afterwards the list, the stats and /health still work."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from dispatch.db import CONNECT_KWARGS
from tests.serve import ServeProcess, serving

# Raw JSON text, so that what no JSON encoder would produce (a lone surrogate) can be sent too.
POISON_JSON = [
    '"a\\u0000b"',
    '{"k": "a\\u0000b"}',
    '{"a\\u0000b": 1}',
    '"\\ud800"',
    '{"k": ["\\udfff"]}',
    "1e400",
    "-1e400",
    "[" * 3000 + "]" * 3000,
    '{"a":' * 3000 + "1" + "}" * 3000,
]
POISON_TIMES = [
    '"9999-12-31T23:59:59-01:00"',
    '"0001-01-01T00:30:00+01:00"',
    '"infinity"',
    '"2024-02-30T00:00:00Z"',
    '"2024-01-01T00:00:00"',
    '"1969-12-31T23:59:59Z"',
]

# (method, path, the other fields of a valid body as JSON text, the fields to poison)
TARGETS: list[tuple[str, str, str, list[str]]] = [
    ("POST", "/api/v1/tasks", '"title": "t"',
     ["description", "owner", "scope", "required_capabilities", "metadata", "context", "source",
      "priority", "timeout_seconds", "heartbeat_seconds", "max_retries", "parent_task_id"]),
    ("POST", "/api/v1/tasks", '"title": "t"', ["available_at"]),
    ("POST", "/api/v1/tasks", '"description": ""', ["title"]),
    ("PATCH", "/api/v1/tasks/{pending}", '"status": "cancelled"',
     ["metadata", "context", "reason"]),
    ("PATCH", "/api/v1/tasks/{pending}", '"metadata": {}', ["priority"]),
    ("POST", "/api/v1/tasks/{running}/progress", '"message": "m"',
     ["percent", "data", "progress", "detail", "lease"]),
    ("POST", "/api/v1/tasks/{running}/progress", '"percent": 1', ["message"]),
    ("POST", "/api/v1/tasks/{running}/complete", '"lease": 1', ["result"]),
    ("POST", "/api/v1/tasks/{running}/fail", '"retry_eligible": true', ["error"]),
    ("POST", "/api/v1/tasks/claim", '"wait_seconds": 0', ["capabilities", "max_tasks"]),
    ("PUT", "/api/v1/agents/worker", '"status": "ready"', ["capabilities", "max_concurrent"]),
]


def body(others: str, field: str, value: str) -> bytes:
    return ("{" + others + f', "{field}": ' + value + "}").encode()


def batch(task_id: str, field: str, value: str) -> bytes:
    return ('[{"task_id": "' + task_id + '", "action": "progress", "' + field + '": ' + value
            + "}]").encode()


def fingerprint(db_url: str) -> tuple[Any, ...]:
    with psycopg.connect(db_url, row_factory=dict_row, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
        row = conn.execute(
            "SELECT (SELECT count(*) FROM dispatch.task_events) AS events,"
            " (SELECT count(*) FROM dispatch.agents) AS agents,"
            " (SELECT string_agg(t::text, '|' ORDER BY task_id) FROM dispatch.tasks t) AS tasks,"
            " (SELECT string_agg(a.agent_id || a.capabilities::text || a.status"
            "   || coalesce(a.max_concurrent, 0), '|') FROM dispatch.agents a) AS agent_rows"
        ).fetchone()
    assert row is not None
    return tuple(row.values())


@pytest.fixture
def world(db_url: str, tmp_path: Path) -> Iterator[tuple[ServeProcess, dict[str, str]]]:
    with serving(db_url, tmp_path) as sp, httpx.Client(base_url=sp.api, timeout=30) as http:
        alice = {"X-Agent-ID": "alice"}
        worker = {"X-Agent-ID": "worker"}
        r = http.put("/api/v1/agents/worker", json={"capabilities": ["w"]}, headers=worker)
        assert r.status_code == 200
        running = http.post("/api/v1/tasks", json={"title": "run", "scope": "w"},
                            headers=alice).json()["task_id"]
        # The worker claims it and starts it, or the assigner pushed it first and it starts it.
        http.post("/api/v1/tasks/claim", json={"wait_seconds": 1, "start": True, "max_tasks": 1},
                  headers=worker)
        deadline = time.monotonic() + 20
        while http.get(f"/api/v1/tasks/{running}", headers=alice).json()["status"] != "running":
            assert time.monotonic() < deadline, "the worker never got its task"
            http.post(f"/api/v1/tasks/{running}/start", headers=worker)
            time.sleep(0.05)
        pending = http.post("/api/v1/tasks", json={"title": "wait", "scope": "nobody"},
                            headers=alice).json()["task_id"]
        yield sp, {"running": running, "pending": pending}


def test_poison_in_every_timestamp_and_json_field_is_4xx_and_changes_nothing(
    world: tuple[ServeProcess, dict[str, str]], db_url: str
) -> None:
    sp, ids = world
    headers = {"Content-Type": "application/json"}
    before = fingerprint(db_url)
    answers: dict[int, int] = {}
    with httpx.Client(base_url=sp.api, timeout=30) as http:
        for method, path, others, fields in TARGETS:
            url = path.format(**ids)
            who = "worker" if ("{running}" in path or "claim" in path or "agents" in path) \
                else "alice"
            for field in fields:
                values = POISON_TIMES if field == "available_at" else POISON_JSON
                for value in values:
                    r = http.request(method, url, content=body(others, field, value),
                                     headers={**headers, "X-Agent-ID": who})
                    answers[r.status_code] = answers.get(r.status_code, 0) + 1
                    assert 400 <= r.status_code < 500, (method, url, field, value[:40], r.text)
                    assert r.json()["error"]
        for field in ("percent", "data", "detail", "message", "lease"):
            for value in POISON_JSON:
                r = http.post("/api/v1/tasks/reports", content=batch(ids["running"], field, value),
                              headers={**headers, "X-Agent-ID": "worker"})
                assert r.status_code < 500, (field, value[:40], r.text)
                if r.status_code == 200:  # refused inside the batch: that report's own status
                    assert r.json()[0]["status"] == 400, (field, value[:40], r.text)
                else:
                    assert r.status_code == 400
        for header, value in (("Idempotency-Key", "a\u0000b"), ("X-Dispatch-Lease", "1e400"),
                              ("X-Dispatch-Lease", "-1"), ("X-Agent-ID", "a\u0000b")):
            try:
                r = http.post(f"/api/v1/tasks/{ids['running']}/progress", content=b"{}",
                              headers={**headers, "X-Agent-ID": "worker", header: value})
            except httpx.LocalProtocolError:
                continue  # the client refuses to send it: nothing reached the server
            assert 400 <= r.status_code < 500, (header, r.text)

        assert fingerprint(db_url) == before
        assert set(answers) <= {400, 413, 415, 422}, answers
        # Everyone can still read the queue, and the service is healthy.
        r = http.get("/api/v1/tasks", headers={"X-Agent-ID": "bob"})
        assert r.status_code == 200 and len(r.json()) == 2
        r = http.get("/api/v1/stats", headers={"X-Agent-ID": "ops",
                                              "Authorization": f"Bearer {sp.admin_token}"})
        assert r.status_code == 200
    health = httpx.get(f"{sp.ops}/health")
    assert health.status_code == 200 and health.json()["database"] == "ok"
    assert "Traceback" not in sp.log()
