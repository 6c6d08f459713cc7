"""The engine inside real `dispatch serve` processes: NOTIFY wake-up with a 60 s tick, the directory
from loopback Warren / PromptForge / Alexandria, waking a sleeping agent, a failing service."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.rows import dict_row

from dispatch.db import CONNECT_KWARGS
from tests.fakes import FakeAlexandria, FakePromptForge, FakeWarren
from tests.serve import ServeProcess, serving


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    """Poll predicate() until it returns something truthy; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def task_row(db_url: str, task_id: uuid.UUID) -> dict[str, Any]:
    with psycopg.connect(db_url, row_factory=dict_row, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
        row = conn.execute("SELECT * FROM dispatch.tasks WHERE task_id = %s", (task_id,)).fetchone()
    assert row is not None
    return row


def create(sp: ServeProcess, requester: str, **body: Any) -> uuid.UUID:
    r = httpx.post(
        f"{sp.api}/api/v1/tasks", json={"title": "work", **body}, headers={"X-Agent-ID": requester}
    )
    assert r.status_code == 201, r.text
    return uuid.UUID(r.json()["task_id"])


def test_new_task_reaches_an_idle_agent_without_waiting_for_the_tick(
    db_url: str, tmp_path: Path
) -> None:
    env = {"DISPATCH_TICK_INTERVAL_MS": "60000"}
    with serving(db_url, tmp_path, env=env) as sp:
        r = httpx.put(
            f"{sp.api}/api/v1/agents/idle-1", json={"capabilities": ["summarise"]},
            headers={"X-Agent-ID": "idle-1"},
        )
        assert r.status_code == 200, r.text
        # The assigner's first round ran at start-up, before the task existed; with a 60 s tick
        # only NOTIFY can wake it in time now.
        task_id = create(sp, "alice", required_capabilities=["summarise"])
        # Well under the 60 s tick: the assignment came from NOTIFY.
        row = wait_for(
            lambda: (t := task_row(db_url, task_id))["status"] == "assigned" and t, 5, "assignment"
        )
        assert row["assigned_agent"] == "idle-1"


def test_directory_wake_and_a_failing_service_in_a_real_process(
    db_url: str,
    tmp_path: Path,
    warren: FakeWarren,
    promptforge: FakePromptForge,
    alexandria: FakeAlexandria,
) -> None:
    warren.set("coder", "ready", "always-on")
    warren.set("writer", "sleeping", "on-demand")
    promptforge.personas = {"coder": ["python"], "writer": ["prose"]}
    alexandria.own("alice", name="coder")
    alexandria.own("alice", identifier="writer")
    env = {
        "DISPATCH_WARREN_URL": warren.url,
        "DISPATCH_WARREN_TOKEN": "w-token",
        "DISPATCH_FORGE_URL": promptforge.url,
        "DISPATCH_ALEXANDRIA_URL": alexandria.url,
        "DISPATCH_DIRECTORY_REFRESH_MS": "100",
        "DISPATCH_OWNER_FILTER_ENABLED": "true",
        "DISPATCH_TICK_INTERVAL_MS": "60000",
    }
    with serving(db_url, tmp_path, env=env) as sp:
        admin = {"X-Agent-ID": "admin", "Authorization": f"Bearer {sp.admin_token}"}

        def capability_map() -> dict[str, Any]:
            r = httpx.get(f"{sp.api}/api/v1/agents", headers=admin)
            assert r.status_code == 200, r.text
            return {a["agent_id"]: a for a in r.json()}

        agents = wait_for(lambda: len(m := capability_map()) == 2 and m, 10, "the directory")
        assert agents["coder"]["capabilities"] == ["python"]
        assert (agents["writer"]["status"], agents["writer"]["policy"]) == ("sleeping", "on-demand")
        assert agents["writer"]["source"] == "warren"

        # A sleeping winner is woken through Warren after the assignment.
        prose = create(sp, "alice", owner="alice", required_capabilities=["prose"])
        wait_for(lambda: task_row(db_url, prose)["assigned_agent"] == "writer", 5, "assignment")
        assert warren.wake_event.wait(5)
        assert warren.wakes == ["writer"]

        bobs = create(sp, "bob", owner="bob")
        explained = httpx.get(f"{sp.api}/api/v1/tasks/{bobs}/explain", headers=admin)
        assert explained.status_code == 200, explained.text
        reasons = {c["agent_id"]: c["reasons"] for c in explained.json()["candidates"]}
        assert reasons["coder"] == ["belongs to alice, not to the task owner bob"]

        # Warren goes down: the last known directory keeps working and /health says so.
        warren.down = True

        def warren_down() -> bool:
            health = httpx.get(f"{sp.ops}/health").json()
            return str(health.get("warren", "")).startswith("down")

        wait_for(warren_down, 5, "health to report Warren down")
        code = create(sp, "alice", owner="alice", required_capabilities=["python"])
        wait_for(lambda: task_row(db_url, code)["assigned_agent"] == "coder", 5, "assignment")
        assert httpx.get(f"{sp.ops}/health").status_code == 200
        metrics = httpx.get(f"{sp.ops}/metrics").text
        assert 'dispatch_directory_service_up{service="warren"} 0.0' in metrics


def timeout_lateness(db_url: str, task_id: uuid.UUID) -> float:
    """Seconds between the attempt's deadline and the reaper's timeout event."""
    with psycopg.connect(db_url, row_factory=dict_row, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
        row = conn.execute(
            "SELECT extract(epoch FROM e.created_at - (a.created_at + interval '1 second'))"
            "::float8 AS late"
            " FROM dispatch.task_events e JOIN dispatch.task_events a USING (task_id)"
            " WHERE e.task_id = %s AND e.event = 'timeout' AND a.event = 'assigned'",
            (task_id,),
        ).fetchone()
    assert row is not None
    return float(row["late"])


def test_a_deadline_fires_on_time_whatever_the_tick(db_url: str, tmp_path: Path) -> None:
    """A 1 s timeout with a 60 s tick: the sleeping reaper is woken by the new deadline, whether
    this replica assigned the task or another one (here: a claim from another connection)."""
    with serving(db_url, tmp_path, env={"DISPATCH_TICK_INTERVAL_MS": "60000"}) as sp:
        # This replica assigns (pull claim over its API).
        r = httpx.post(
            f"{sp.api}/api/v1/tasks",
            json={"title": "quick", "timeout_seconds": 1, "max_retries": 0, "scope": "x"},
            headers={"X-Agent-ID": "alice"},
        )
        here = uuid.UUID(r.json()["task_id"])
        r = httpx.put(f"{sp.api}/api/v1/agents/puller", json={"capabilities": ["x"]},
                      headers={"X-Agent-ID": "puller"})
        assert r.status_code == 200
        r = httpx.post(f"{sp.api}/api/v1/tasks/claim", json={"wait_seconds": 1},
                       headers={"X-Agent-ID": "puller"})
        assert r.status_code in (200, 204)  # 204: this replica's assigner pushed it first
        wait_for(lambda: task_row(db_url, here)["assigned_agent"] == "puller", 10, "assignment")

        # Another replica assigns: the task is created and claimed in one transaction elsewhere,
        # so this replica's engine never saw it pending.
        with psycopg.connect(db_url, row_factory=dict_row, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
            with conn.transaction():
                row = conn.execute(
                    "SELECT task_id FROM dispatch.create_task('elsewhere', timeout_seconds => 1,"
                    " max_retries => 0, required_capabilities => '{y}')"
                ).fetchone()
                assert row is not None
                conn.execute("SELECT dispatch.agent_upsert('other-replica-agent', '{y}')")
                claimed = conn.execute(
                    "SELECT task_id FROM dispatch.task_claim('other-replica-agent', '{y}')"
                ).fetchone()
            assert claimed == row
        there = row["task_id"]

        for task_id in (here, there):
            wait_for(lambda t=task_id: task_row(db_url, t)["status"] == "timed_out", 10, "timeout")
            assert 0 <= timeout_lateness(db_url, task_id) <= 0.5
