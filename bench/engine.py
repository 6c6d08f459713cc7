"""Dispatch's lifecycle in-process (no HTTP): submit, assign or claim, start, complete through
dispatch.broker on one pool, the way the API and the assigner call it."""

from __future__ import annotations

import asyncio
import contextlib
import time

from bench.common import Latencies, Sizes
from bench.cpu import CpuMeter
from bench.pg import Cluster, cost_between, prepare_dispatch, read_counters
from bench.results import Throughput
from dispatch import db
from dispatch.broker import Broker
from dispatch.models import Assignment, Complete, NewTask, Start
from dispatch.store import Store

REQUESTER = "bench-requester"
RESULT = {"ok": True}

# Flow control configured for the drain, which must keep at least 0.8x the plain drain's rate:
# four tenants, two of them weighted, and every task under one concurrency key and one rate key
# whose limits are far above what the drain reaches, so they cost their checks and locks but
# never hold a task back.
FLOW_TENANTS = ("bench-tenant-a", "bench-tenant-b", "bench-tenant-c", "bench-tenant-d")
FLOW_KEY = "bench-key"


def new_task(i: int, prefix: str, flow: bool) -> tuple[NewTask, str]:
    if not flow:
        return NewTask(title=f"{prefix} {i}"), REQUESTER
    return (NewTask(title=f"{prefix} {i}", concurrency_key=FLOW_KEY, rate_key=FLOW_KEY),
            FLOW_TENANTS[i % len(FLOW_TENANTS)])


async def configure_flow(broker: Broker) -> None:
    await broker.flow.tenant_weight_set(FLOW_TENANTS[0], 2)
    await broker.flow.tenant_weight_set(FLOW_TENANTS[1], 0.5)
    await broker.flow.concurrency_limit_set(FLOW_KEY, 1_000_000)
    await broker.flow.rate_limit_set(FLOW_KEY, 1e12, 1e12)


async def submit_all(
    broker: Broker, n: int, producers: int, prefix: str = "bench", flow: bool = False
) -> float:
    """n single-task submits from `producers` concurrent requesters; returns seconds."""
    counter = iter(range(n))

    async def producer() -> None:
        for i in counter:
            task, requester = new_task(i, prefix, flow)
            await broker.submit(task, requester=requester)

    t0 = time.perf_counter()
    await asyncio.gather(*(producer() for _ in range(producers)))
    return time.perf_counter() - t0


async def register_agents(
    broker: Broker, prefix: str, count: int, max_concurrent: int
) -> list[str]:
    ids = [f"{prefix}-{i:03d}" for i in range(count)]
    for agent_id in ids:
        await broker.agents.upsert(agent_id, owner=REQUESTER, max_concurrent=max_concurrent)
    return ids


async def drain_pull(broker: Broker, agents: list[str], n: int, lat: Latencies) -> float:
    """Each agent claims, starts and completes one task at a time until n are done."""
    done = 0

    async def agent(agent_id: str) -> None:
        nonlocal done
        misses = 0
        while done < n and misses < 50:
            t0 = time.perf_counter()
            task = await broker.claim(agent_id)
            lat.add_since(t0)
            if task is None:
                misses += 1
                await asyncio.sleep(0.002)
                continue
            misses = 0
            await broker.apply(Start(task_id=task.task_id, agent_id=agent_id))
            await broker.apply(Complete(task_id=task.task_id, actor=agent_id, result=RESULT))
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(agent(a) for a in agents))
    if done < n:
        raise RuntimeError(f"pull drain stopped after {done} of {n} tasks")
    return time.perf_counter() - t0


async def drain_push(
    broker: Broker, slots: int, n: int, batch: int, lat: Latencies
) -> float:
    """One assigner calls task_assign in batches; `slots` workers start and complete what it
    hands out (the agents' side, as an agent told of its assignment would)."""
    queue: asyncio.Queue[Assignment | None] = asyncio.Queue()
    freed = asyncio.Event()
    done = 0

    async def worker() -> None:
        nonlocal done
        while (a := await queue.get()) is not None:
            await broker.apply(Start(task_id=a.task_id, agent_id=a.agent_id))
            await broker.apply(Complete(task_id=a.task_id, actor=a.agent_id, result=RESULT))
            done += 1
            freed.set()

    async def assigner() -> None:
        assigned = 0
        idle = 0
        while assigned < n and idle < 200:
            freed.clear()
            t0 = time.perf_counter()
            got = await broker.assign(batch=batch)
            lat.add_since(t0)
            for a in got:
                queue.put_nowait(a)
            assigned += len(got)
            if not got:
                idle += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(freed.wait(), 0.05)
            else:
                idle = 0
        for _ in range(slots):
            queue.put_nowait(None)

    t0 = time.perf_counter()
    await asyncio.gather(assigner(), *(worker() for _ in range(slots)))
    if done < n:
        raise RuntimeError(f"push drain stopped after {done} of {n} tasks")
    return time.perf_counter() - t0


async def run_engine(cluster: Cluster, sizes: Sizes, mode: str, flow: bool = False) -> Throughput:
    """mode `push` (task_assign batches) or `pull` (task_claim per agent); with `flow`, fair
    share across weighted tenants, a concurrency key and a rate limit configured."""
    dbname = f"engine_{mode}_flow" if flow else f"engine_{mode}"
    url = cluster.create_database(dbname)
    await asyncio.to_thread(prepare_dispatch, url)
    n = sizes.engine_tasks
    pool = db.create_pool(url, min_size=sizes.connections, max_size=sizes.connections)
    await pool.open(wait=True)
    lat = Latencies()
    try:
        broker = Broker(Store(pool))
        await broker.apply_config()
        if flow:
            await configure_flow(broker)
        if mode == "pull":
            # One coroutine per agent, each holding one task at a time.
            agents = await register_agents(broker, "pull", sizes.connections * 2, 1)
        else:
            slots_per_agent = sizes.pgq_batch
            agents = await register_agents(broker, "push", sizes.pgq_consumers, slots_per_agent)
        cluster.checkpoint()
        before = read_counters(cluster.admin_url, dbname)
        meter = CpuMeter(cluster.postmaster)
        enqueue_s = await asyncio.wait_for(
            submit_all(broker, n, sizes.producers, flow=flow), sizes.phase_timeout
        )
        if mode == "pull":
            drain = drain_pull(broker, agents, n, lat)
        else:
            drain = drain_push(broker, len(agents) * sizes.pgq_batch, n, sizes.assign_batch, lat)
        drain_s = await asyncio.wait_for(drain, sizes.phase_timeout)
        cpu = meter.stop()
    finally:
        await pool.close()
    await asyncio.sleep(0.2)
    after = read_counters(cluster.admin_url, dbname)
    cost = cost_between(cluster.admin_url, before, after)
    if mode == "pull":
        settings = f"{len(agents)} agents x 1 task, pool {sizes.connections}, task_claim"
    else:
        settings = (
            f"{sizes.pgq_consumers} agents x {sizes.pgq_batch} slots, pool {sizes.connections}, "
            f"task_assign batch {sizes.assign_batch}"
        )
    if flow:
        settings += (f", flow control: {len(FLOW_TENANTS)} tenants (2 weighted), every task under"
                     " one concurrency key and one rate key (limits not binding)")
    return Throughput(
        system=f"Dispatch engine ({mode}{', flow control' if flow else ''})", n=n,
        enqueue_s=enqueue_s, drain_s=drain_s,
        cost=cost, settings=settings + f", {sizes.producers} producers", claim_ms=lat.ms, cpu=cpu,
    )
