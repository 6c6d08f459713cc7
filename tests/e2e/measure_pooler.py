"""`dispatch serve` directly on Postgres, behind PgBouncer in session mode and in transaction mode
(not a test: a measurement, on a throwaway cluster of the distribution's PostgreSQL, or with
--build embedded of pgserver's).

    .venv/bin/python -m tests.e2e.measure_pooler [--rounds 2] [--build embedded]

For each: the wake-up latency (an agent waits in a long-poll claim; a task is created; the time
from the create's request to the claim's answer, 300 times in a row) and the REST lifecycle's
throughput (3 requesters create 1,500 tasks while 6 agents claim and complete them), with the
count of answers of 5xx."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg

from dispatch.db import CONNECT_KWARGS
from dispatch.migrate import migrate
from tests import pg, pgbouncer, pgdist
from tests.serve import ServeProcess, serving

WAKEUPS = 300
TASKS = 1500
AGENTS = 6
REQUESTERS = 3


async def wakeups(sp: ServeProcess) -> str:
    lat: list[float] = []
    errors = 0
    async with httpx.AsyncClient(base_url=sp.api, timeout=60) as http:
        me = {"X-Agent-ID": "waiter"}
        await http.put("/api/v1/agents/waiter", json={"capabilities": ["w"], "max_concurrent": 1},
                       headers=me)
        for _ in range(WAKEUPS):
            claim = asyncio.create_task(
                http.post("/api/v1/tasks/claim", json={"wait_seconds": 10}, headers=me))
            await asyncio.sleep(0.01)  # the claim is waiting
            sent = time.perf_counter()
            r = await http.post("/api/v1/tasks", headers={"X-Agent-ID": "req"},
                                json={"title": "w", "required_capabilities": ["w"]})
            errors += r.status_code >= 500
            got = await claim
            lat.append((time.perf_counter() - sent) * 1000)
            if got.status_code != 200:
                errors += 1
                continue
            task = got.json()
            r = await http.post(f"/api/v1/tasks/{task['task_id']}/complete",
                                json={"result": {}, "lease": task["lease"]}, headers=me)
            errors += r.status_code >= 500
    lat.sort()
    return (f"wake-up p50 {lat[len(lat) // 2]:.1f} ms, p95 {lat[int(len(lat) * 0.95)]:.1f} ms,"
            f" {errors} errors")


async def throughput(sp: ServeProcess) -> str:
    done = errors = 0
    finished = asyncio.Event()
    async with httpx.AsyncClient(base_url=sp.api, timeout=60,
                                 limits=httpx.Limits(max_connections=64)) as http:
        for i in range(AGENTS):
            await http.put(f"/api/v1/agents/a{i}", headers={"X-Agent-ID": f"a{i}"},
                           json={"capabilities": ["x"], "max_concurrent": 1})

        async def agent(i: int) -> None:
            nonlocal done, errors
            me = {"X-Agent-ID": f"a{i}"}
            while not finished.is_set():
                r = await http.post("/api/v1/tasks/claim", json={"wait_seconds": 1}, headers=me)
                errors += r.status_code >= 500
                if r.status_code != 200:
                    continue
                task = r.json()
                r = await http.post(f"/api/v1/tasks/{task['task_id']}/complete",
                                    json={"result": {}, "lease": task["lease"]}, headers=me)
                errors += r.status_code >= 500
                if r.status_code == 200:
                    done += 1
                    if done >= TASKS:
                        finished.set()

        async def requester() -> None:
            nonlocal errors
            for _ in range(TASKS // REQUESTERS):
                r = await http.post("/api/v1/tasks", json={
                    "title": "t", "required_capabilities": ["x"]}, headers={"X-Agent-ID": "req"})
                errors += r.status_code >= 500

        started = time.perf_counter()
        agents = [asyncio.create_task(agent(i)) for i in range(AGENTS)]
        await asyncio.gather(*(requester() for _ in range(REQUESTERS)))
        await asyncio.wait_for(finished.wait(), 300)
        elapsed = time.perf_counter() - started
        await asyncio.gather(*agents)
    return f"lifecycle {TASKS / elapsed:.0f} tasks/s, {errors} errors"


@contextlib.contextmanager
def cluster(build: str) -> Iterator[str]:
    """A superuser URL to the `postgres` database of a throwaway server of the build."""
    if build == "embedded":
        with pg.embedded_server() as url:
            yield url
    else:
        with pgdist.cluster() as url:
            yield url


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--build", choices=("distribution", "embedded"), default="distribution")
    args = parser.parse_args()
    with cluster(args.build) as server:
        with psycopg.connect(server, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
            conn.execute("CREATE DATABASE dispatch")
            # What transaction mode needs of the server (docs/operations.md).
            for name, value in (("TimeZone", "UTC"), ("lock_timeout", "2000ms"),
                                ("statement_timeout", "15000ms")):
                conn.execute(f"ALTER ROLE postgres IN DATABASE dispatch SET {name} = '{value}'")
        url = pg.database_url(server, "dispatch")
        migrate(url)
        tmp = Path(tempfile.mkdtemp())
        quiet = {"DISPATCH_LOG_LEVEL": "warning"}
        for _ in range(args.rounds):
            with serving(url, tmp, env=quiet) as sp:
                print("direct:", asyncio.run(wakeups(sp)), "|", asyncio.run(throughput(sp)),
                      flush=True)
            with pgbouncer.pgbouncer(url, "session", pool_size=30) as pooled, \
                    serving(pooled, tmp, env=quiet) as sp:
                print("pgbouncer session:", asyncio.run(wakeups(sp)), "|",
                      asyncio.run(throughput(sp)), flush=True)
            transaction = {**quiet, "DISPATCH_DATABASE_POOL_MODE": "transaction",
                           "DISPATCH_DATABASE_LISTEN_URL": url}
            with pgbouncer.pgbouncer(url, "transaction", pool_size=10) as pooled, \
                    serving(pooled, tmp, env=transaction) as sp:
                print("pgbouncer transaction:", asyncio.run(wakeups(sp)), "|",
                      asyncio.run(throughput(sp)), flush=True)


if __name__ == "__main__":
    main()
