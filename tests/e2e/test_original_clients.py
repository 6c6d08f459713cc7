"""Clients written for the original service, against `dispatch serve` on its defaults: their
request shapes and flows work unchanged (README, "Clients of the original service")."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serve import ServeProcess, serving


@pytest.fixture
def sp(db_url: str, tmp_path: Path) -> Iterator[ServeProcess]:
    with serving(db_url, tmp_path) as sp:
        yield sp


def call(sp: ServeProcess, method: str, path: str, agent: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{sp.api}/api/v1{path}", headers={"X-Agent-ID": agent}, **kwargs)


def events(sp: ServeProcess, task_id: str) -> list[dict[str, Any]]:
    r = call(sp, "GET", f"/tasks/{task_id}/events", "alice")
    assert r.status_code == 200
    result: list[dict[str, Any]] = r.json()
    return result


def test_create_then_complete_while_pending(sp: ServeProcess) -> None:
    """The original's smoke flow: nobody can take the task, its requester resolves it."""
    r = call(sp, "POST", "/tasks", "alice", json={"title": "smoke", "scope": "nobody-has-this"})
    assert r.status_code == 201
    task_id = r.json()["task_id"]
    r = call(sp, "POST", f"/tasks/{task_id}/complete", "alice", json={"result": {"ok": True}})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "completed" and r.json()["result"] == {"ok": True}
    last = events(sp, task_id)[-1]
    assert (last["event"], last["actor"], last["payload"]["manual"]) == ("completed", "alice", True)
    # A stranger cannot, and a finished task stays finished.
    other = call(sp, "POST", "/tasks", "alice", json={"title": "second"}).json()["task_id"]
    r = call(sp, "POST", f"/tasks/{other}/complete", "mallory", json={"result": {}})
    assert r.status_code == 403
    assert call(sp, "GET", f"/tasks/{other}", "alice").json()["status"] == "pending"


def test_progress_in_the_original_shape_and_in_progress_filter(sp: ServeProcess) -> None:
    r = call(sp, "PUT", "/agents/worker-1", "worker-1", json={"capabilities": ["code"]})
    assert r.status_code == 200 and r.json()["owner"] is None
    task_id = call(sp, "POST", "/tasks", "alice", json={"title": "t", "scope": "code"}).json()[
        "task_id"
    ]
    # An agent without an owner takes anyone's work: the assigner pushes it.
    deadline = time.monotonic() + 10
    while (task := call(sp, "GET", f"/tasks/{task_id}", "worker-1").json())["status"] != "assigned":
        assert time.monotonic() < deadline, task
        time.sleep(0.05)
    assert task["assigned_agent"] == "worker-1"

    path = f"/tasks/{task_id}/progress"
    r = call(sp, "POST", path, "worker-1", json={"progress": 0.5, "detail": "halfway"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "running"
    assert r.json()["progress"] == {"percent": 50, "message": "halfway"}
    # A fraction is scaled as written: 0.07 is 7 percent, not 7.000000000000001.
    r = call(sp, "POST", path, "worker-1", json={"progress": 0.07})
    assert r.json()["progress"]["percent"] == 7
    r = call(sp, "POST", path, "worker-1", json={"progress": 75, "detail": {"files": 3}})
    assert r.json()["progress"] == {"percent": 75, "data": {"files": 3}}
    before = events(sp, task_id)
    for bad, field in (
        ({"progress": 0.5, "percent": 50}, "progress"),
        ({"detail": "x", "message": "y"}, "detail"),
        ({"progress": 101}, None),
    ):
        r = call(sp, "POST", path, "worker-1", json=bad)
        assert r.status_code == 400, (bad, r.text)
        if field is not None:
            assert r.json()["detail"]["field"] == field
    assert events(sp, task_id) == before

    r = call(sp, "GET", "/tasks?status=in_progress", "alice")
    assert r.status_code == 200 and [t["task_id"] for t in r.json()] == [task_id]
    r = call(sp, "GET", "/tasks?status=pending,in_progress", "alice")
    assert [t["status"] for t in r.json()] == ["running"]
    r = call(sp, "GET", "/tasks?status=working", "alice")
    assert r.status_code == 400 and "in_progress" in r.json()["error"]


def test_stats_carry_the_original_keys(sp: ServeProcess) -> None:
    admin = {"X-Agent-ID": "ops", "Authorization": f"Bearer {sp.admin_token}"}
    ids = [
        call(sp, "POST", "/tasks", "alice", json={"title": f"t{i}", "scope": "none"}).json()[
            "task_id"
        ]
        for i in range(3)
    ]
    call(sp, "POST", f"/tasks/{ids[0]}/complete", "alice", json={"result": {}})
    r = httpx.get(f"{sp.api}/api/v1/stats", headers=admin)
    assert r.status_code == 200
    stats = r.json()
    assert stats["total_pending"] == 2 and stats["total_completed"] == 1
    assert stats["total_in_progress"] == 0 and stats["total_failed"] == 0
    assert "avg_completion_ms" in stats
