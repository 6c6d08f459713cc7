"""Three `dispatch serve` replicas on one database, 2,000 tasks, 20 agents claiming, being pushed
work, failing now and then and completing, all over REST at once. The event history must show that
no task was ever held by two agents, no agent was ever above its limit, and every task completed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from dispatch.broker import Broker
from dispatch.db import CONNECT_KWARGS
from dispatch.settings import AssignmentSettings
from dispatch.store import Store
from tests.history import replay
from tests.serve import ServeProcess, start_serve

TASKS = 2000
AGENTS = 20
LIMIT = 3
FAIL_RATE = 0.03
DEADLINE_S = 75


class Swarm:
    """The test's agents and requesters: HTTP clients spread over the replicas."""

    def __init__(self, replicas: list[ServeProcess]) -> None:
        self.replicas = replicas
        self.completed = 0
        self.failed = 0
        self.claimed = 0
        self.pushed = 0
        self.done = asyncio.Event()

    def url(self, i: int) -> str:
        return self.replicas[i % len(self.replicas)].api

    async def requester(self, index: int, count: int) -> None:
        async with httpx.AsyncClient(base_url=self.url(index), timeout=30) as http:
            for n in range(count):
                r = await http.post(
                    "/api/v1/tasks",
                    json={"title": f"job {index}-{n}", "max_retries": 10,
                          "priority": n % 3, "required_capabilities": ["work"]},
                    headers={"X-Agent-ID": f"requester-{index}"},
                )
                assert r.status_code == 201, r.text

    async def agent(self, index: int) -> None:
        me = f"agent-{index:02d}"
        rng = random.Random(index)
        headers = {"X-Agent-ID": me}
        async with httpx.AsyncClient(base_url=self.url(index), timeout=30, headers=headers) as http:
            r = await http.put(
                f"/api/v1/agents/{me}", json={"capabilities": ["work"], "max_concurrent": LIMIT}
            )
            assert r.status_code == 200, r.text
            while not self.done.is_set():
                # Pushed work first (the assigners gave it to me), then pull one more.
                r = await http.get(
                    "/api/v1/tasks", params={"assignee": me, "status": "assigned", "limit": LIMIT}
                )
                assert r.status_code == 200, r.text
                mine = [t["task_id"] for t in r.json()]
                self.pushed += len(mine)
                if not mine:
                    r = await http.post("/api/v1/tasks/claim", json={"wait_seconds": 0.2})
                    assert r.status_code in (200, 204), r.text
                    if r.status_code == 200:
                        self.claimed += 1
                        mine = [r.json()["task_id"]]
                for task_id in mine:
                    await self.work(http, task_id, rng)

    async def work(self, http: httpx.AsyncClient, task_id: str, rng: random.Random) -> None:
        r = await http.post(f"/api/v1/tasks/{task_id}/start")
        if r.status_code == 409:  # taken back meanwhile (never happens here, but is legal)
            return
        assert r.status_code == 200, r.text
        if rng.random() < FAIL_RATE:
            r = await http.post(f"/api/v1/tasks/{task_id}/fail", json={"error": "flaky"})
            assert r.status_code == 200, r.text
            self.failed += 1
            return
        r = await http.post(f"/api/v1/tasks/{task_id}/complete", json={"result": {"ok": True}})
        assert r.status_code == 200, r.text
        self.completed += 1
        if self.completed >= TASKS:
            self.done.set()


async def test_three_replicas_two_thousand_tasks_twenty_agents(db_url: str, tmp_path: Path) -> None:
    env = {
        "DISPATCH_RETRY_BACKOFF_MS": "20",
        "DISPATCH_RETRY_BACKOFF_MAX_MS": "200",
        "DISPATCH_TICK_INTERVAL_MS": "1000",
        "DISPATCH_LOG_LEVEL": "warning",
    }
    replicas: list[ServeProcess] = []
    try:
        for i in range(3):
            (tmp_path / str(i)).mkdir()
            replicas.append(
                await asyncio.to_thread(start_serve, db_url, tmp_path / str(i), env=env)
            )
        swarm = Swarm(replicas)
        started = time.monotonic()
        agents = [asyncio.create_task(swarm.agent(i)) for i in range(AGENTS)]
        requesters = [swarm.requester(i, TASKS // 10) for i in range(10)]
        async with asyncio.timeout(DEADLINE_S):
            await asyncio.gather(*requesters)
            await swarm.done.wait()
            await asyncio.gather(*agents)
        wall = time.monotonic() - started
        per_replica = []
        async with httpx.AsyncClient() as http:
            for sp in replicas:
                text = (await http.get(f"{sp.ops}/metrics")).text
                line = next(
                    x for x in text.splitlines() if x.startswith("dispatch_assign_batch_size_sum")
                )
                per_replica.append(int(float(line.split()[-1])))
    finally:
        for t in locals().get("agents", []):
            t.cancel()
        for sp in replicas:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(sp.stop)

    with psycopg.connect(
        db_url, row_factory=dict_row, **CONNECT_KWARGS  # type: ignore[arg-type]
    ) as conn:
        statuses = {
            r["status"]: r["count"]
            for r in conn.execute(
                "SELECT status::text AS status, count(*) AS count FROM dispatch.tasks GROUP BY 1"
            ).fetchall()
        }
        events = conn.execute(
            "SELECT id, task_id, event, actor, payload FROM dispatch.task_events ORDER BY id"
        ).fetchall()
        load = conn.execute(
            "SELECT agent_id, active_tasks, slots_held FROM dispatch.agent_load"
        ).fetchall()
        completions = conn.execute(
            "SELECT count(*) AS n FROM dispatch.task_events WHERE event = 'completed'"
        ).fetchone()

    assert statuses == {"completed": TASKS}
    assert completions is not None and completions["n"] == TASKS  # each exactly once
    history = replay(events, LIMIT)
    assert not history.double and not history.over_limit and not history.foreign_reports, history
    peak, assignments = history.peak, history.assignments
    assert all(r["active_tasks"] == r["slots_held"] == 0 for r in load), load
    assert len(load) == AGENTS
    by_mode = Counter(e["payload"].get("mode") for e in events if e["event"] == "assigned")
    print(
        f"\nmulti-replica: {TASKS} tasks, {AGENTS} agents (limit {LIMIT}), 3 replicas: "
        f"{wall:.1f} s wall, {TASKS / wall:.0f} tasks/s; {assignments} assignments "
        f"(push {by_mode['push']}, claim {by_mode['claim']}), {swarm.failed} failures retried, "
        f"peak per agent {peak}; pushed per replica {per_replica}"
    )
    assert sum(per_replica) == by_mode["push"]
    # Everyone shared the work.
    per_agent = Counter(
        e["payload"]["assigned_agent"] for e in events if e["event"] == "completed"
    )
    assert len(per_agent) == AGENTS


async def test_a_replica_with_other_assignment_settings_warns_naming_the_keys(
    pool: AsyncConnectionPool[Any], caplog: pytest.LogCaptureFixture
) -> None:
    first = Broker(Store(pool), assignment=AssignmentSettings(max_concurrent_per_agent=5))
    await first.apply_config()
    same = Broker(Store(pool), assignment=AssignmentSettings(max_concurrent_per_agent=5))
    caplog.clear()
    await same.apply_config()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    other = Broker(
        Store(pool),
        assignment=AssignmentSettings(max_concurrent_per_agent=5, wake_timeout_ms=1000),
    )
    await other.apply_config()
    [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "assignment.wake_timeout_ms" in warning.getMessage()
    assert "max_concurrent_per_agent" not in warning.getMessage()
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT wake_timeout_ms FROM dispatch.config")
        assert (await cur.fetchone())["wake_timeout_ms"] == 1000  # the last start wins
