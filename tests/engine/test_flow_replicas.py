"""Flow control across three `dispatch serve` replicas on one database, agents over REST: a
concurrency cap and a rate limit hold for the whole swarm, as the event history shows."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from dispatch.db import CONNECT_KWARGS
from tests.serve import ServeProcess, start_serve

pytestmark = pytest.mark.slow

ADMIN = "test-admin-token"
ENV = {"DISPATCH_TICK_INTERVAL_MS": "5000", "DISPATCH_LOG_LEVEL": "warning"}


async def replicas(db_url: str, tmp_path: Path, n: int = 3) -> list[ServeProcess]:
    started = []
    for i in range(n):
        (tmp_path / str(i)).mkdir()
        started.append(await asyncio.to_thread(start_serve, db_url, tmp_path / str(i), env=ENV))
    return started


async def stop(procs: list[ServeProcess]) -> None:
    for sp in procs:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(sp.stop)


def rows(db_url: str, query: str) -> list[dict[str, Any]]:
    with psycopg.connect(db_url, row_factory=dict_row, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
        return conn.execute(query).fetchall()  # type: ignore[arg-type]


async def test_a_cap_of_three_holds_across_three_replicas_and_twenty_agents(
    db_url: str, tmp_path: Path
) -> None:
    tasks, keyed = 300, 150
    procs = await replicas(db_url, tmp_path)
    done = asyncio.Event()
    completed = 0

    async def agent(i: int) -> None:
        nonlocal completed
        me = f"agent-{i:02d}"
        async with httpx.AsyncClient(base_url=procs[i % 3].api, timeout=30,
                                     headers={"X-Agent-ID": me}) as http:
            r = await http.put(f"/api/v1/agents/{me}", json={"max_concurrent": 3})
            assert r.status_code == 200, r.text
            while not done.is_set():
                r = await http.get("/api/v1/tasks",
                                   params={"assignee": me, "status": "assigned", "limit": 3})
                mine = [t["task_id"] for t in r.json()]
                if not mine:
                    r = await http.post("/api/v1/tasks/claim", json={"wait_seconds": 0.2})
                    assert r.status_code in (200, 204), r.text
                    mine = [r.json()["task_id"]] if r.status_code == 200 else []
                for task_id in mine:
                    r = await http.post(f"/api/v1/tasks/{task_id}/start")
                    assert r.status_code == 200, r.text
                    # Work long enough that keyed tasks queue behind the cap (agents now take
                    # what is pushed to them at once: 10 ms of work kept up with the supply).
                    await asyncio.sleep(0.1)
                    r = await http.post(f"/api/v1/tasks/{task_id}/complete", json={"result": {}})
                    assert r.status_code == 200, r.text
                    completed += 1
                    if completed >= tasks:
                        done.set()

    try:
        async with httpx.AsyncClient(base_url=procs[0].api, timeout=30) as http:
            r = await http.put("/api/v1/limits/concurrency/repo-x", json={"max_active": 3},
                               headers={"X-Agent-ID": "ops", "Authorization": f"Bearer {ADMIN}"})
            assert r.status_code == 200, r.text
            agents = [asyncio.create_task(agent(i)) for i in range(20)]
            for n in range(tasks):
                body: dict[str, Any] = {"title": f"job {n}"}
                if n % 2 == 0:
                    body["concurrency_key"] = "repo-x"
                r = await http.post(
                    f"{procs[n % 3].api}/api/v1/tasks", json=body,
                    headers={"X-Agent-ID": f"requester-{n % 4}"})
                assert r.status_code == 201, r.text
            async with asyncio.timeout(120):
                await done.wait()
                await asyncio.gather(*agents)
    finally:
        for t in locals().get("agents", []):
            t.cancel()
        await stop(procs)

    keys = {r["task_id"]: r["concurrency_key"] for r in rows(
        db_url, "SELECT task_id, concurrency_key FROM dispatch.tasks")}
    events = rows(db_url, "SELECT task_id, event FROM dispatch.task_events"
                          " WHERE event IN ('assigned', 'completed') ORDER BY id")
    # Replayed in id order: a key's assignments and completions take their ids under its row lock.
    active = peak = assigned = 0
    for e in events:
        if keys[e["task_id"]] != "repo-x":
            continue
        assigned += e["event"] == "assigned"
        active += 1 if e["event"] == "assigned" else -1
        peak = max(peak, active)
    assert assigned == keyed and active == 0
    assert peak == 3, peak
    state = rows(db_url, "SELECT active_tasks FROM dispatch.concurrency_limit_list()")
    assert state == [{"active_tasks": 0}]


async def test_a_bucket_of_sixty_a_minute_lets_sixty_through_across_three_replicas(
    db_url: str, tmp_path: Path
) -> None:
    # Time scaled by two: a bucket refilling 2 tokens a second lets 60 tasks through in 30 s,
    # the arithmetic of 60 a minute. Capacity 3: a wake-up that comes a little late loses nothing.
    window = timedelta(seconds=30)
    procs = await replicas(db_url, tmp_path)
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            headers = {"X-Agent-ID": "ops", "Authorization": f"Bearer {ADMIN}"}
            r = await http.put(f"{procs[0].api}/api/v1/limits/rate/openai", headers=headers,
                               json={"capacity": 3, "refill_per_second": 2})
            assert r.status_code == 200, r.text
            for i in range(5):
                r = await http.put(f"{procs[i % 3].api}/api/v1/agents/agent-{i}",
                                   headers={"X-Agent-ID": f"agent-{i}"},
                                   json={"max_concurrent": 1000})
                assert r.status_code == 200, r.text
            for n in range(200):  # a flood: far more than the bucket lets through
                r = await http.post(f"{procs[n % 3].api}/api/v1/tasks",
                                    headers={"X-Agent-ID": "requester"},
                                    json={"title": f"call {n}", "rate_key": "openai"})
                assert r.status_code == 201, r.text
            # Also an agent pulling, through another replica, all along.
            r = await http.put(f"{procs[2].api}/api/v1/agents/puller",
                               headers={"X-Agent-ID": "puller"}, json={"max_concurrent": 1000})
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                r = await http.post(f"{procs[2].api}/api/v1/tasks/claim",
                                    headers={"X-Agent-ID": "puller"}, json={"wait_seconds": 1})
                assert r.status_code in (200, 204), r.text
                got = rows(db_url, "SELECT count(*) AS n FROM dispatch.tasks"
                                   " WHERE status = 'assigned'")[0]["n"]
                if got >= 80:
                    break
            # The metrics show the bucket and the tasks it holds back (polled: at the instant a
            # token arrives, before an assigner takes it, nothing is held).
            held: list[str] = []
            for _ in range(50):
                text = (await http.get(f"{procs[1].ops}/metrics")).text
                assert 'dispatch_rate_limit_tokens{key="openai"}' in text
                held = [line for line in text.splitlines()
                        if line.startswith("dispatch_flow_held_tasks{")
                        and 'rule="rate"' in line and 'key="openai"' in line]
                if held:
                    break
                await asyncio.sleep(0.1)
            assert held and float(held[0].split()[-1]) > 50, text
    finally:
        await stop(procs)

    times = [r["assigned_at"] for r in rows(
        db_url, "SELECT assigned_at FROM dispatch.tasks WHERE assigned_at IS NOT NULL"
                " ORDER BY assigned_at")]
    assert len(times) >= 80, len(times)  # enough for the window
    # After the first burst (the full bucket), count a window's worth of assignments.
    start = times[10]
    inside = sum(1 for t in times if start < t <= start + window)
    assert 59 <= inside <= 61, inside
    modes = rows(db_url, "SELECT payload->>'mode' AS mode, count(*) AS n FROM dispatch.task_events"
                         " WHERE event = 'assigned' GROUP BY 1")
    assert {m["mode"] for m in modes} >= {"push"}
