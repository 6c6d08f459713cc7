"""Claim and complete latency against a deep backlog: 10 k pending tasks behind saturated agents,
with the assigner running rounds back to back in its own process the whole time, as it does on
a busy replica. A round must not make claims and completions wait, and must cost O(batch).

One agent claims and completes in turn on one connection, as at the scale phase's 10 k-row point
its claims are compared with: the same client, so that the ratio is the backlog's and the
rounds'. Four such claimers on a two-core machine measured CPU sharing, not the queue: their
claim p99 was the same (9-11 ms) with the rounds running and with the rounds replaced by a sleep.
Nor do the rounds share the claimer's event loop, where its replies waited for their Python work
(one claimer, rounds in its process: ratio 1.35-2.11 in four runs; in their own: 1.17-1.43)."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row

from bench.common import Latencies, Sizes
from bench.pg import Cluster, prepare_dispatch
from dispatch.db import CONNECT_KWARGS, create_pool
from dispatch.models import Complete
from dispatch.store import Store

PUSHED = 12  # agents the assigner fills (limit 1 each): saturated from the first round on
PULLER = "puller"  # the agent that completes and claims again in a loop, timed
_PENDING = """
INSERT INTO dispatch.tasks (title, requester, source, required_capabilities)
SELECT 'backlog ' || g, 'bench', 'bench', '{work}' FROM generate_series(1, %(n)s::integer) g
"""


@dataclass
class BacklogResult:
    pending: int
    claim: Latencies
    complete: Latencies
    rounds: Latencies
    assigned: int


async def _connect(url: str) -> psycopg.AsyncConnection[dict[str, object]]:
    return await psycopg.AsyncConnection.connect(
        url, **CONNECT_KWARGS, row_factory=dict_row  # type: ignore[arg-type]
    )


def _rounds(url: str, batch: int, ready: Any, stop: Any, out: Any) -> None:
    """The assigner: rounds back to back from `ready` until `stop` is set, then sends (their ms,
    the tasks they gave)."""

    async def main() -> tuple[list[float], int]:
        store = Store(create_pool(url))  # never opened: every call passes its own connection
        rounds, assigned = Latencies(), 0
        async with await _connect(url) as conn:
            ready.set()
            while not stop.is_set():
                t0 = time.perf_counter()
                got = await store.tasks.assign(batch, conn=conn)
                rounds.add_since(t0)
                assigned += len(got)
        return rounds.ms, assigned

    out.send(asyncio.run(main()))


async def run_backlog(cluster: Cluster, sizes: Sizes) -> BacklogResult:
    url = cluster.create_database("backlog")
    await asyncio.to_thread(prepare_dispatch, url)
    store = Store(create_pool(url))  # never opened: every call passes its own connection
    claim, complete, rounds = Latencies(), Latencies(), Latencies()
    async with await _connect(url) as setup:
        for i in range(PUSHED):
            await store.agents.upsert(f"pushed-{i}", capabilities=["work"], max_concurrent=1,
                                     conn=setup)
        await store.agents.upsert(PULLER, capabilities=["work"], max_concurrent=1, conn=setup)
        await setup.execute(_PENDING, {"n": sizes.backlog_pending})  # type: ignore[arg-type]
        await setup.execute("VACUUM (ANALYZE) dispatch.tasks")
    # The rounds run in a process of their own, as the assigner does in serve: in the puller's
    # process, the puller's replies would wait for the rounds' Python work on one event loop.
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_rounds, args=(url, sizes.assign_batch, ready, stop, child),
                       daemon=True)

    async def puller(n: int) -> None:
        agent = PULLER
        async with await _connect(url) as conn:
            for _ in range(n):
                # What it holds: its last claim, or what the assigner pushed to it meanwhile.
                cur = await conn.execute(
                    "SELECT task_id FROM dispatch.tasks"
                    " WHERE assigned_agent = %s AND status IN ('assigned', 'running')",
                    (agent,),
                )
                for row in await cur.fetchall():
                    t0 = time.perf_counter()
                    task_id = row["task_id"]
                    assert isinstance(task_id, uuid.UUID)
                    done = Complete(task_id=task_id, actor=agent)
                    await store.tasks.apply(done, conn=conn)
                    complete.add_since(t0)
                t0 = time.perf_counter()
                await store.tasks.claim(agent, conn=conn)
                claim.add_since(t0)

    proc.start()
    try:
        if not await asyncio.to_thread(ready.wait, 60):
            raise RuntimeError("backlog: the assigner's process did not start")
        await asyncio.wait_for(puller(max(sizes.backlog_samples, 1)), sizes.phase_timeout)
    finally:
        stop.set()
        sent = await asyncio.to_thread(parent.poll, 30)
        got = parent.recv() if sent else None
        await asyncio.to_thread(proc.join, 30)
    if got is None:
        raise RuntimeError("backlog: the assigner's process ended without its rounds")
    rounds.ms, assigned = got
    with psycopg.connect(cluster.admin_url, autocommit=True) as admin:
        admin.execute('DROP DATABASE "backlog" WITH (FORCE)')
    return BacklogResult(sizes.backlog_pending, claim, complete, rounds, assigned)
