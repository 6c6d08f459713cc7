"""Replicas under kill -9: three `dispatch serve` replicas on one database, agents working over
REST through whichever replica answers, a backlog of tasks, and one replica killed (and a new one
started) a second in and then every few seconds. Measured: time until every task is done; from
the event history, double assignments and agents over their limit; tasks lost."""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
from psycopg.rows import dict_row

from bench.common import Sizes
from bench.pg import Cluster, prepare_dispatch
from tests.history import replay
from tests.serve import ServeProcess, start_serve

REPLICAS = 3
AGENTS = 12
LIMIT = 2
GIVE_UP_S = 120.0
_PENDING = """
INSERT INTO dispatch.tasks (title, requester, source, required_capabilities, max_retries)
SELECT 'backlog ' || g, 'bench', 'bench', '{work}', 20 FROM generate_series(1, %(n)s::integer) g
"""


@dataclass
class ReplicasResult:
    replicas: int
    agents: int
    limit: int
    tasks: int
    kill_every_s: float
    kills: int
    all_done_s: float | None
    waited_s: float
    unfinished: int
    lost: int
    double: int
    over_limit: int


class _Fleet:
    def __init__(self, url: str, tmp: Path) -> None:
        self.url, self.tmp = url, tmp
        self.live: list[ServeProcess] = []
        self.kills = 0

    def start(self) -> None:
        env = {"DISPATCH_RETRY_BACKOFF_MS": "20", "DISPATCH_RETRY_BACKOFF_MAX_MS": "200",
               "DISPATCH_LOG_LEVEL": "warning", "DISPATCH_TICK_INTERVAL_MS": "1000"}
        where = self.tmp / f"r{len(self.live) + self.kills}"
        where.mkdir()
        self.live.append(start_serve(self.url, where, env=env))

    def kill_one(self, rng: random.Random) -> None:
        victim = self.live.pop(rng.randrange(len(self.live)))
        victim.kill()
        self.kills += 1

    def api(self, rng: random.Random) -> str:
        return rng.choice(self.live).api


async def _agent(fleet: _Fleet, i: int, done: asyncio.Event) -> None:
    me = f"agent-{i:02d}"
    rng = random.Random(i)
    headers = {"X-Agent-ID": me}
    async with httpx.AsyncClient(timeout=5, headers=headers) as http:
        while not done.is_set():
            base = fleet.api(rng)
            try:
                r = await http.get(f"{base}/api/v1/tasks", params={
                    "assignee": me, "status": "assigned,running", "limit": LIMIT})
                mine = [t["task_id"] for t in r.json()] if r.status_code == 200 else []
                if not mine:
                    r = await http.post(f"{base}/api/v1/tasks/claim",
                                        json={"max_tasks": LIMIT, "start": True,
                                              "wait_seconds": 0.5})
                    mine = [t["task_id"] for t in r.json()] if r.status_code == 200 else []
                if mine:
                    await http.post(f"{base}/api/v1/tasks/reports", json=[
                        {"task_id": t, "action": "complete", "result": {"ok": True}}
                        for t in mine])
            except (httpx.HTTPError, ValueError):
                await asyncio.sleep(0.05)  # that replica died: another one next time


async def run_replicas(cluster: Cluster, sizes: Sizes) -> ReplicasResult:
    url = cluster.create_database("replicas")
    await asyncio.to_thread(prepare_dispatch, url)
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        for i in range(AGENTS):
            conn.execute("SELECT dispatch.agent_upsert(%s, '{work}', p_max_concurrent => %s)",
                         (f"agent-{i:02d}", LIMIT))
        conn.execute(_PENDING, {"n": sizes.replicas_tasks})  # type: ignore[arg-type]
    rng = random.Random(7)
    done = asyncio.Event()
    with tempfile.TemporaryDirectory(prefix="dispatch-bench-replicas-") as tmp:
        fleet = _Fleet(url, Path(tmp))
        try:
            for _ in range(REPLICAS):
                await asyncio.to_thread(fleet.start)
            agents = [asyncio.create_task(_agent(fleet, i, done)) for i in range(AGENTS)]
            t0 = time.perf_counter()
            # The first kill a second in: on a fast machine the backlog is done within one
            # period, and a run with no kill would show nothing.
            next_kill = t0 + min(1.0, sizes.replicas_kill_every)
            all_done: float | None = None
            unfinished = sizes.replicas_tasks
            with psycopg.connect(url, autocommit=True) as conn:
                while time.perf_counter() - t0 < min(GIVE_UP_S, sizes.phase_timeout):
                    row = conn.execute("SELECT count(*) FROM dispatch.tasks"
                                       " WHERE status <> 'completed'").fetchone()
                    unfinished = int(row[0]) if row else sizes.replicas_tasks
                    if unfinished == 0:
                        all_done = time.perf_counter() - t0
                        break
                    if time.perf_counter() >= next_kill:
                        fleet.kill_one(rng)
                        await asyncio.to_thread(fleet.start)
                        next_kill += sizes.replicas_kill_every
                    await asyncio.sleep(0.1)
            waited = time.perf_counter() - t0
            done.set()
            await asyncio.gather(*agents, return_exceptions=True)
        finally:
            for sp in fleet.live:
                with contextlib.suppress(Exception):
                    sp.stop()
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        events = conn.execute(
            "SELECT task_id, event, actor, payload FROM dispatch.task_events ORDER BY id"
        ).fetchall()
        counted = conn.execute("SELECT count(*) AS n FROM dispatch.tasks").fetchone()
        present = int(counted["n"]) if counted else 0
    history = replay(events, LIMIT)
    with psycopg.connect(cluster.admin_url, autocommit=True) as admin:
        admin.execute('DROP DATABASE "replicas" WITH (FORCE)')
    return ReplicasResult(
        REPLICAS, AGENTS, LIMIT, sizes.replicas_tasks, sizes.replicas_kill_every, fleet.kills,
        all_done, waited, unfinished,
        sizes.replicas_tasks - present, len(history.double), len(history.over_limit),
    )
