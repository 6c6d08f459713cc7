"""The peers on the same Postgres: pgqueuer and procrastinate doing enqueue, claim, complete with
their recommended settings, and a raw single-row SKIP LOCKED loop as the floor."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import psycopg

from bench.common import Latencies, Sizes
from bench.cpu import CpuMeter
from bench.pg import Cluster, cost_between, read_counters
from bench.results import Throughput


async def _producers(n: int, producers: int, enqueue_one: list) -> float:  # type: ignore[type-arg]
    counter = iter(range(n))

    async def producer(fn) -> None:  # type: ignore[no-untyped-def]
        for i in counter:
            await fn(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(producer(fn) for fn in enqueue_one[:producers]))
    return time.perf_counter() - t0


def _asyncpg_args(url: str) -> dict[str, str]:
    """asyncpg takes keyword arguments; our URLs are libpq conninfo strings."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(url)
    names = {"host": "host", "port": "port", "user": "user", "password": "password",
             "dbname": "database"}
    return {names[k]: str(v) for k, v in params.items() if k in names and v not in (None, "")}


# -- pgqueuer ------------------------------------------------------------------------------------


async def run_pgqueuer(cluster: Cluster, sizes: Sizes) -> Throughput:
    """pgqueuer's own drain benchmark shape (tools/benchmark.py --strategy drain): asyncpg, one
    connection per consumer, batch 10, 4 consumers, mode=drain; single-job enqueues."""
    import asyncpg
    from pgqueuer import PgQueuer
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    from pgqueuer.queries import Queries
    from pgqueuer.types import QueueExecutionMode

    dbname = "peer_pgqueuer"
    url = cluster.create_database(dbname)
    n = sizes.engine_tasks
    setup = await asyncpg.connect(**_asyncpg_args(url))
    await Queries(AsyncpgDriver(setup)).install()
    await setup.close()

    cluster.checkpoint()
    before = read_counters(cluster.admin_url, dbname)
    prod_conns = [await asyncpg.connect(**_asyncpg_args(url)) for _ in range(sizes.producers)]
    meter = CpuMeter(cluster.postmaster)
    fns = []
    for c in prod_conns:
        q = Queries(AsyncpgDriver(c))

        async def enqueue(i: int, q: Queries = q) -> None:
            await q.enqueue("job", b"", 0)

        fns.append(enqueue)
    enqueue_s = await _producers(n, sizes.producers, fns)
    for c in prod_conns:
        await c.close()

    done = 0
    consumers: list[PgQueuer] = []
    conns = [await asyncpg.connect(**_asyncpg_args(url)) for _ in range(sizes.pgq_consumers)]
    for c in conns:
        pgq = PgQueuer(AsyncpgDriver(c))

        @pgq.entrypoint("job")
        async def job(j: Job) -> None:
            nonlocal done
            done += 1

        consumers.append(pgq)
    t0 = time.perf_counter()
    await asyncio.wait_for(
        asyncio.gather(
            *(
                pgq.run(
                    batch_size=sizes.pgq_batch,
                    mode=QueueExecutionMode.drain,
                    dequeue_timeout=timedelta(seconds=1),
                )
                for pgq in consumers
            )
        ),
        sizes.phase_timeout,
    )
    drain_s = time.perf_counter() - t0
    cpu = meter.stop()
    for c in conns:
        await c.close()
    if done < n:
        raise RuntimeError(f"pgqueuer drained {done} of {n}")
    await asyncio.sleep(0.2)
    cost = cost_between(cluster.admin_url, before, read_counters(cluster.admin_url, dbname))
    return Throughput(
        system="pgqueuer", n=n, enqueue_s=enqueue_s, drain_s=drain_s, cost=cost,
        settings=f"asyncpg, {sizes.pgq_consumers} consumers, batch {sizes.pgq_batch}, drain mode"
        f", {sizes.producers} producers", cpu=cpu,
    )


# -- procrastinate -------------------------------------------------------------------------------


async def run_procrastinate(cluster: Cluster, sizes: Sizes) -> Throughput:
    """An async task, App.run_worker_async(wait=False) (returns once the queue is empty), worker
    concurrency = BENCH_CONNECTIONS over a pool of that size, listen_notify on (the default)."""
    import logging

    from procrastinate import App, PsycopgConnector

    logging.getLogger("procrastinate").setLevel(logging.WARNING)
    dbname = "peer_procrastinate"
    url = cluster.create_database(dbname)
    n = sizes.engine_tasks
    pool_size = sizes.connections + 2  # + the worker's LISTEN connection and its heartbeat
    app = App(connector=PsycopgConnector(conninfo=url, min_size=pool_size, max_size=pool_size))
    done = 0

    @app.task(name="job")
    async def job() -> None:
        nonlocal done
        done += 1

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        cluster.checkpoint()
        before = read_counters(cluster.admin_url, dbname)

        async def enqueue(i: int) -> None:
            await job.defer_async()

        meter = CpuMeter(cluster.postmaster)
        enqueue_s = await _producers(n, sizes.producers, [enqueue] * sizes.producers)
        t0 = time.perf_counter()
        await asyncio.wait_for(
            app.run_worker_async(
                wait=False, concurrency=sizes.connections, install_signal_handlers=False
            ),
            sizes.phase_timeout,
        )
        drain_s = time.perf_counter() - t0
        cpu = meter.stop()
    if done < n:
        raise RuntimeError(f"procrastinate ran {done} of {n}")
    await asyncio.sleep(0.2)
    cost = cost_between(cluster.admin_url, before, read_counters(cluster.admin_url, dbname))
    return Throughput(
        system="procrastinate", n=n, enqueue_s=enqueue_s, drain_s=drain_s, cost=cost,
        settings=f"psycopg pool {pool_size}, worker concurrency {sizes.connections}"
        f", {sizes.producers} producers", cpu=cpu,
    )


# -- the floor -----------------------------------------------------------------------------------

_RAW_SCHEMA = """
CREATE TABLE raw_jobs (
    id         bigserial PRIMARY KEY,
    status     text NOT NULL DEFAULT 'queued',
    payload    jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX raw_jobs_queued_idx ON raw_jobs (id) WHERE status = 'queued';
"""

_RAW_CLAIM = """
UPDATE raw_jobs SET status = 'running'
WHERE id = (SELECT id FROM raw_jobs WHERE status = 'queued' ORDER BY id LIMIT 1
            FOR UPDATE SKIP LOCKED)
RETURNING id
"""


async def run_raw(cluster: Cluster, sizes: Sizes) -> Throughput:
    """One row per statement: INSERT; claim = UPDATE ... (SELECT ... FOR UPDATE SKIP LOCKED);
    complete = UPDATE status. Autocommit, one connection per worker, prepared by psycopg."""
    dbname = "floor_raw"
    url = cluster.create_database(dbname)
    n = sizes.engine_tasks
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(_RAW_SCHEMA)
    cluster.checkpoint()
    before = read_counters(cluster.admin_url, dbname)

    prod = [await psycopg.AsyncConnection.connect(url, autocommit=True, prepare_threshold=0)
            for _ in range(sizes.producers)]
    meter = CpuMeter(cluster.postmaster)
    fns = []
    for c in prod:
        async def enqueue(i: int, c: psycopg.AsyncConnection = c) -> None:  # type: ignore[type-arg]
            await c.execute("INSERT INTO raw_jobs (payload) VALUES ('{}')")

        fns.append(enqueue)
    enqueue_s = await _producers(n, sizes.producers, fns)
    for c in prod:
        await c.close()

    lat = Latencies()
    done = 0

    async def worker() -> None:
        nonlocal done
        async with await psycopg.AsyncConnection.connect(
            url, autocommit=True, prepare_threshold=0
        ) as c:
            while True:
                t0 = time.perf_counter()
                row = await (await c.execute(_RAW_CLAIM)).fetchone()
                lat.add_since(t0)
                if row is None:
                    return
                await c.execute("UPDATE raw_jobs SET status = 'done' WHERE id = %s", (row[0],))
                done += 1

    t0 = time.perf_counter()
    await asyncio.wait_for(
        asyncio.gather(*(worker() for _ in range(sizes.connections))), sizes.phase_timeout
    )
    drain_s = time.perf_counter() - t0
    cpu = meter.stop()
    if done < n:
        raise RuntimeError(f"raw loop completed {done} of {n}")
    await asyncio.sleep(0.2)
    cost = cost_between(cluster.admin_url, before, read_counters(cluster.admin_url, dbname))
    return Throughput(
        system="raw SKIP LOCKED (floor)", n=n, enqueue_s=enqueue_s, drain_s=drain_s, cost=cost,
        settings=f"{sizes.connections} workers, 1 row per statement, {sizes.producers} producers",
        claim_ms=lat.ms, cpu=cpu,
    )
