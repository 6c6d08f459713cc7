"""A 1,000-task diamond of dependencies runs to the end on three `dispatch serve` replicas while one
of them is killed with SIGKILL every 5 s (and started again), about five kills in all.

The plan: a root; 499 tasks that each depend on the root; 499 that each depend on two neighbours
of those; a last task that depends on all 499 of the second layer. Agents claim (and start) over
REST from whichever replica answers and complete what they hold; a request the kill cut off is
retried on another replica (a claim under its Idempotency-Key, so that it answers what it took
rather than leaving that to time out). What must hold: every task completes, each was assigned
exactly once, and none started before the last of its dependencies had completed."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.serve import ServeProcess, start_serve

Sql = psycopg.Connection[dict[str, Any]]
REPLICAS = 3
KILL_EVERY_S = 5
WIDTH = 499
AGENTS = 6
# What an agent spends on each task: the run spans several kills (about 25 s in all).
WORK_S = 0.15


class Cluster:
    """The replicas' API URLs as they are now (a killed one is replaced by its restart)."""

    def __init__(self, replicas: list[ServeProcess]) -> None:
        self.replicas = replicas

    async def call(self, http: httpx.AsyncClient, method: str, path: str,
                   headers: dict[str, str], **kwargs: Any) -> httpx.Response:
        """The request, on a random replica; on another after a dropped connection or a 503."""
        async with asyncio.timeout(60):
            while True:
                api = random.choice(self.replicas).api
                try:
                    r = await http.request(method, api + path, headers=headers, **kwargs)
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
                    continue
                if r.status_code != 503:
                    return r
                await asyncio.sleep(0.05)


async def plan(cluster: Cluster, http: httpx.AsyncClient) -> list[str]:
    """The diamond, created by one planner; ids in creation order."""
    me = {"X-Agent-ID": "planner"}

    async def create(title: str, deps: list[str]) -> str:
        # The key makes a create repeated after a lost answer return the first task.
        r = await cluster.call(http, "POST", "/api/v1/tasks", {**me, "Idempotency-Key": title},
                               json={"title": title, "required_capabilities": ["dag"],
                                     "depends_on": deps})
        assert r.status_code in (200, 201), r.text
        return str(r.json()["task_id"])

    root = await create("root", [])
    first = [await create(f"a{i}", [root]) for i in range(WIDTH)]
    second = [await create(f"b{i}", [first[i], first[(i + 1) % WIDTH]]) for i in range(WIDTH)]
    last = await create("last", second)
    return [root, *first, *second, last]


async def agent(cluster: Cluster, http: httpx.AsyncClient, me: str, stop: asyncio.Event) -> None:
    headers = {"X-Agent-ID": me}
    r = await cluster.call(http, "PUT", f"/api/v1/agents/{me}", headers,
                           json={"capabilities": ["dag"], "max_concurrent": 5})
    assert r.status_code == 200, r.text
    while not stop.is_set():
        # Sent again under its key when a kill cut it off: it answers what it took.
        key = {"Idempotency-Key": uuid.uuid4().hex}
        r = await cluster.call(http, "POST", "/api/v1/tasks/claim", {**headers, **key},
                               json={"max_tasks": 5, "start": True, "wait_seconds": 1})
        if r.status_code == 204:
            continue
        assert r.status_code == 200, r.text
        for task in r.json():
            if task["status"] == "assigned":  # pushed by the assigner, not yet started
                s = await cluster.call(http, "POST", f"/api/v1/tasks/{task['task_id']}/start",
                                       headers, json={"lease": task["lease"]})
                assert s.status_code == 200, s.text
            await asyncio.sleep(WORK_S)
            c = await cluster.call(http, "POST", f"/api/v1/tasks/{task['task_id']}/complete",
                                   headers, json={"result": {"by": me}, "lease": task["lease"]})
            assert c.status_code == 200, c.text


@pytest.mark.timeout(600)
async def test_a_diamond_of_1000_tasks_survives_replicas_killed_every_5_s(
    db_url: str, sql: Sql, tmp_path: Path
) -> None:
    def start(i: int) -> ServeProcess:
        home = tmp_path / f"replica-{i}-{time.monotonic_ns()}"
        home.mkdir()
        return start_serve(db_url, home, env={"DISPATCH_LOG_LEVEL": "warning"})

    cluster = Cluster([start(i) for i in range(REPLICAS)])
    stop = asyncio.Event()
    kills = 0

    async def killer() -> None:
        nonlocal kills
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), KILL_EVERY_S)
            if stop.is_set():
                return
            victim = kills % REPLICAS
            await asyncio.to_thread(cluster.replicas[victim].kill)
            kills += 1
            cluster.replicas[victim] = await asyncio.to_thread(start, victim)

    try:
        async with httpx.AsyncClient(timeout=30) as http:
            chaos = asyncio.create_task(killer())
            ids = await plan(cluster, http)
            assert len(ids) == 2 * WIDTH + 2 == 1000
            workers = [asyncio.create_task(agent(cluster, http, f"agent-{i}", stop))
                       for i in range(AGENTS)]
            async with asyncio.timeout(420):
                while True:
                    row = sql.execute("SELECT count(*) AS n FROM dispatch.tasks"
                                      " WHERE status = 'completed'").fetchone()
                    assert row is not None
                    if row["n"] == len(ids):
                        break
                    for w in workers:
                        if w.done():
                            w.result()  # an agent's failed assertion ends the test
                    await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*workers, chaos)
    finally:
        stop.set()
        for replica in cluster.replicas:
            replica.stop()
    assert kills >= 3
    # Each task assigned exactly once: no attempt was lost to a killed replica and given again.
    assigned = sql.execute(
        "SELECT task_id, count(*) FILTER (WHERE event = 'assigned') AS n"
        " FROM dispatch.task_events WHERE task_id = ANY (%s::uuid[]) GROUP BY task_id",
        (ids,)).fetchall()
    twice = [r["task_id"] for r in assigned if r["n"] != 1]
    history = sql.execute(
        "SELECT task_id, event, actor, payload, created_at FROM dispatch.task_events"
        " WHERE task_id = ANY (%s) ORDER BY id", (twice,)).fetchall() if twice else []
    assert len(assigned) == len(ids) and not twice, history
    # None started before the last of its dependencies completed.
    early = sql.execute(
        "SELECT d.task_id, d.depends_on FROM dispatch.task_dependencies d"
        " JOIN dispatch.tasks t ON t.task_id = d.task_id"
        " JOIN dispatch.tasks dep ON dep.task_id = d.depends_on"
        " WHERE t.started_at < dep.completed_at OR NOT d.satisfied").fetchall()
    assert early == []
    row = sql.execute("SELECT count(*) AS n FROM dispatch.task_dependencies").fetchone()
    assert row is not None and row["n"] == WIDTH + 2 * WIDTH + WIDTH
