"""Claim and assign latency with few and with many terminal rows in dispatch.tasks, and with a
backlog ahead of the work that no agent can take (no agent has its capability), after the
reaper's sweep has parked it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import psycopg
from psycopg.rows import dict_row

from bench.common import Latencies, Sizes
from bench.pg import Cluster, prepare_dispatch
from dispatch.db import CONNECT_KWARGS, create_pool
from dispatch.models import Complete
from dispatch.store import Store

REQUESTER = "bench-requester"

# Terminal history written straight into the table: session_replication_role = replica skips the
# per-row triggers (no event rows, no NOTIFY), as a restore or a bulk import would.
_SEED = """
INSERT INTO dispatch.tasks (title, requester, owner, source, status, assigned_agent,
                            timeout_seconds, result, created_at, updated_at, assigned_at,
                            started_at, completed_at, available_at)
SELECT 'history ' || g, %(requester)s, %(requester)s, 'sql', 'completed', 'history-agent', 300,
       '{"ok": true}', t, t + interval '3 s', t + interval '1 s', t + interval '1 s',
       t + interval '3 s', t
FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) g,
     LATERAL (SELECT now() - interval '7 days' + g * interval '10 ms') AS c(t)
"""

# Pending tasks that need a capability no agent has, ahead of every task timed (the same
# priority, queued earlier): each claim and round passes over all of them.
_STRANDED = """
INSERT INTO dispatch.tasks (title, requester, source, required_capabilities, timeout_seconds)
SELECT 'stranded ' || g, %(requester)s, 'sql', '{nobody-has-this}', 300
FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) g
"""

_PENDING = """
INSERT INTO dispatch.tasks (title, requester, source)
SELECT 'scale ' || g, %(requester)s, 'bench' FROM generate_series(1, %(n)s::integer) g
"""


@dataclass
class ScalePoint:
    terminal_rows: int
    table_mb: float
    seed_s: float
    claim: Latencies
    assign: Latencies
    assign_batch: int
    stranded_rows: int = 0  # pending rows no agent can take, ahead of the timed ones


async def _seed(url: str, rows: int, sql: str = _SEED) -> float:
    t0 = time.perf_counter()
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("SET session_replication_role = replica")
        chunk = 200_000
        for lo in range(1, rows + 1, chunk):
            await conn.execute(
                sql, {"requester": REQUESTER, "lo": lo, "hi": min(rows, lo + chunk - 1)}
            )
        await conn.execute("SET session_replication_role = origin")
        await conn.execute("VACUUM (ANALYZE) dispatch.tasks")
    return time.perf_counter() - t0


async def measure_point(
    cluster: Cluster, sizes: Sizes, rows: int, *, stranded: bool = False
) -> ScalePoint:
    """`rows` terminal rows, or with `stranded` as many pending rows that no agent can take."""
    dbname = f"scale_{rows}" + ("_stranded" if stranded else "")
    url = cluster.create_database(dbname)
    await asyncio.to_thread(prepare_dispatch, url)
    seed_s = await _seed(url, rows, _STRANDED if stranded else _SEED)
    # The seed's WAL (a million rows, and their VACUUM) would otherwise end in a checkpoint
    # during the samples, timed as if a claim or a round had caused it.
    cluster.checkpoint()
    samples = sizes.scale_samples
    claim, assign = Latencies(), Latencies()
    async with await psycopg.AsyncConnection.connect(
        url, **CONNECT_KWARGS, row_factory=dict_row  # type: ignore[arg-type]
    ) as conn:
        store = Store(create_pool(url))  # never opened: every call below passes conn
        for i in range(4):
            await store.agents.upsert(
                f"scale-{i}", owner=REQUESTER, max_concurrent=10, conn=conn
            )
        if stranded:
            # A deployment's reaper sweeps every tick, a share of the line each: it parks what
            # no agent could take, out of the walk, and autovacuum then clears the rows the
            # parking left behind. Here, sweeps until one has reached the end of the line.
            while True:
                await store.tasks.park_unmatched(conn=conn)
                cur = await conn.execute(
                    "SELECT 1 FROM dispatch.unmatched_walks WHERE walker = 'park'")
                if await cur.fetchone() is None:
                    break
            await conn.execute("VACUUM (ANALYZE) dispatch.tasks")
        # pull: one agent claims, then completes, `samples` times
        await conn.execute(_PENDING, {"requester": REQUESTER, "n": samples})
        for _ in range(samples):
            t0 = time.perf_counter()
            claimed = await store.tasks.claim("scale-0", conn=conn)
            claim.add_since(t0)
            if not claimed:
                raise RuntimeError("scale: nothing to claim")
            await store.tasks.apply(
                Complete(task_id=claimed[0].task_id, actor="scale-0"), conn=conn
            )
        # push: task_assign batches over 4 agents, completed before the next batch
        await conn.execute(_PENDING, {"requester": REQUESTER, "n": samples})
        left = samples
        while left > 0:
            t0 = time.perf_counter()
            got = await store.tasks.assign(sizes.assign_batch, conn=conn)
            assign.add_since(t0)
            if not got:
                raise RuntimeError("scale: nothing assigned")
            for a in got:
                await store.tasks.apply(Complete(task_id=a.task_id, actor=a.agent_id), conn=conn)
            left -= len(got)
        cur = await conn.execute(
            "SELECT pg_total_relation_size('dispatch.tasks') / 1048576.0 AS mb"
        )
        row = await cur.fetchone()
        mb = float(row["mb"]) if row else 0.0
    with psycopg.connect(cluster.admin_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE "{dbname}" WITH (FORCE)')
    if stranded:
        return ScalePoint(0, mb, seed_s, claim, assign, sizes.assign_batch, stranded_rows=rows)
    return ScalePoint(rows, mb, seed_s, claim, assign, sizes.assign_batch)


async def run_scale(cluster: Cluster, sizes: Sizes) -> list[ScalePoint]:
    return [
        await measure_point(cluster, sizes, sizes.scale_small),
        await measure_point(cluster, sizes, sizes.scale_large),
        await measure_point(cluster, sizes, sizes.scale_small, stranded=True),
    ]
