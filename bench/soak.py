"""`make bench-soak`: a paced in-process lifecycle for BENCH_SOAK_SECONDS with the pruner running
(a short retention, so that history partitions are created and dropped during the run), sampling
dead tuples of the hot tables (a partitioned table's partitions summed) and claim latency per
interval."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import psycopg

from bench.common import Latencies, Sizes, percentile
from bench.engine import REQUESTER, RESULT, register_agents
from bench.pg import Cluster, prepare_dispatch
from dispatch import db
from dispatch.broker import Broker
from dispatch.engine.pruner import Pruner
from dispatch.models import Complete, NewTask, Start
from dispatch.notify import WORK_CHANNEL, Listener
from dispatch.store import Store

_TABLE_STATS = """
SELECT r.relname, sum(s.n_live_tup)::bigint, sum(s.n_dead_tup)::bigint,
       sum(s.autovacuum_count)::bigint, sum(s.n_tup_hot_upd)::bigint, sum(s.n_tup_upd)::bigint
FROM pg_stat_user_tables s
JOIN pg_class r ON r.oid = coalesce(pg_partition_root(s.relid), s.relid)
WHERE s.schemaname = 'dispatch' AND r.relname IN ('tasks', 'task_events', 'agents')
GROUP BY r.relname
"""
_PARTITIONS = "SELECT count(*) FROM dispatch.history_partitions WHERE from_at IS NOT NULL"


@dataclass
class SoakSample:
    t: float
    completed: int
    tables: dict[str, tuple[int, int, int, int, int]]  # live, dead, autovacuums, hot, upd
    claim_p50: float
    claim_p99: float
    claims: int
    partitions: int = 0  # of the event history, then
    pruned: int = 0  # tasks deleted by retention so far
    dropped: int = 0  # history partitions dropped so far


@dataclass
class SoakResult:
    seconds: float
    rate: int
    agents: int
    completed: int
    samples: list[SoakSample] = field(default_factory=list)
    started: str = ""
    finished: str = ""
    load_before: str = ""
    load_after: str = ""
    retention_minutes: float = 0.0
    prune_seconds: float = 0.0
    build: str = "embedded"


async def run_soak(cluster: Cluster, sizes: Sizes) -> SoakResult:
    url = cluster.create_database("soak")
    await asyncio.to_thread(prepare_dispatch, url)
    pool = db.create_pool(url, min_size=sizes.connections, max_size=sizes.connections)
    await pool.open(wait=True)
    listener = Listener(url)
    await listener.start()
    broker = Broker(Store(pool), listener=listener)
    await broker.apply_config()
    agents = await register_agents(broker, "soak", sizes.connections, 1)
    result = SoakResult(sizes.soak_seconds, sizes.soak_rate, len(agents), 0,
                        retention_minutes=sizes.soak_retention_minutes,
                        prune_seconds=sizes.soak_prune_seconds, build=cluster.build)
    pruner = Pruner(broker, retention_hours=sizes.soak_retention_minutes / 60,
                    interval_seconds=sizes.soak_prune_seconds)
    await pruner.run_once()  # as serve does at start: partitions before the first event
    window = Latencies()
    stop_at = time.monotonic() + sizes.soak_seconds
    completed = 0

    async def producer() -> None:
        t0 = time.perf_counter()
        i = 0
        while time.monotonic() < stop_at:
            target = t0 + i / sizes.soak_rate
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await broker.submit(NewTask(title=f"soak {i}"), requester=REQUESTER)
            i += 1

    async def agent(agent_id: str) -> None:
        nonlocal completed
        while time.monotonic() < stop_at:
            woken = listener.event(WORK_CHANNEL)
            t0 = time.perf_counter()
            task = await broker.claim(agent_id)
            if task is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), 0.5)
                continue
            window.add_since(t0)
            await broker.apply(Start(task_id=task.task_id, agent_id=agent_id))
            await broker.apply(Complete(task_id=task.task_id, actor=agent_id, result=RESULT))
            completed += 1

    async def prune() -> None:
        while time.monotonic() < stop_at:
            await pruner.run_once()
            await asyncio.sleep(min(sizes.soak_prune_seconds, max(0.0, stop_at - time.monotonic())))

    async def sampler() -> None:
        started = time.monotonic()
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            while True:
                remaining = stop_at - time.monotonic()
                await asyncio.sleep(max(0.0, min(sizes.soak_sample_seconds, remaining)))
                await conn.execute("SELECT pg_stat_clear_snapshot()")
                rows = await (await conn.execute(_TABLE_STATS)).fetchall()
                parts = await (await conn.execute(_PARTITIONS)).fetchone()
                ms = window.ms
                window.ms = []
                sample = SoakSample(
                    t=time.monotonic() - started, completed=completed,
                    tables={r[0]: (r[1], r[2], r[3], r[4], r[5]) for r in rows},
                    claim_p50=percentile(ms, 50), claim_p99=percentile(ms, 99), claims=len(ms),
                    partitions=parts[0] if parts else 0, pruned=pruner.pruned,
                    dropped=pruner.partitions_dropped,
                )
                result.samples.append(sample)
                dead = {k: v[1] for k, v in sample.tables.items()}
                print(f"  soak t={sample.t:6.0f}s completed={completed} dead={dead} "
                      f"claim p50={sample.claim_p50:.2f} ms p99={sample.claim_p99:.2f} ms "
                      f"partitions={sample.partitions} pruned={sample.pruned} "
                      f"dropped={sample.dropped}",
                      flush=True)
                if time.monotonic() >= stop_at:
                    return

    try:
        await asyncio.gather(producer(), sampler(), prune(), *(agent(a) for a in agents))
    finally:
        await listener.stop()
        await pool.close()
    result.completed = completed
    return result
