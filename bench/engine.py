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
from dispatch.errors import Conflict
from dispatch.models import (
    Assignment,
    Complete,
    NewTask,
    NextClaim,
    ReportOutcomeWithNext,
    Start,
    Task,
)
from dispatch.store import Store
from dispatch.wire import MAX_REPORTS

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


NEXT = NextClaim(start=True)  # a report's claim of the agent's next task, started


async def run_on(broker: Broker, agent_id: str, task: Task) -> Task | None:
    """Complete a started task, claiming the agent's next one (its own pushed tasks first, then
    new ones), started, in the same transaction: one commit per task for a busy agent, as the
    SDK's workers do."""
    _, claimed = await broker.apply_then_claim(
        Complete(task_id=task.task_id, actor=agent_id, result=RESULT), agent_id, NEXT)
    return claimed[0] if claimed else None


async def drain_pull(
    broker: Broker, agents: list[str], slots: int, n: int, lat: Latencies
) -> tuple[float, int]:
    """Each agent runs `slots` tasks at a time, as the SDK's worker does in pull mode: it claims
    (started, in the same step) as many tasks as it has idle slots, and each slot then keeps going
    on what its completion's next brings; a slot whose completion brought nothing is idle again.
    The agent's completions go as its Reports send them. Returns the seconds and the completion
    requests sent."""
    reports = {a: Reports(broker, a) for a in agents}
    done = 0

    async def agent(agent_id: str) -> None:
        nonlocal done
        idle = slots
        freed = asyncio.Event()
        running: list[asyncio.Task[None]] = []

        async def slot(task: Task | None) -> None:
            nonlocal done, idle
            try:
                while task is not None:
                    task = await reports[agent_id].complete(task)
                    done += 1
            finally:
                idle += 1
                freed.set()

        misses = 0
        while done < n and misses < 50:
            if idle == 0:
                freed.clear()
                await freed.wait()
                continue
            t0 = time.perf_counter()
            claimed = await broker.claim_many(agent_id, max_tasks=idle, start=True)
            lat.add_since(t0)
            if not claimed:
                misses += 1
                await asyncio.sleep(0.002)
                continue
            misses = 0
            idle -= len(claimed)
            running.extend(asyncio.create_task(slot(task)) for task in claimed)
        await asyncio.gather(*running)

    senders = [asyncio.create_task(r.send()) for r in reports.values()]
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(agent(a) for a in agents))
    finally:
        for sender in senders:
            sender.cancel()
    if done < n:
        raise RuntimeError(f"pull drain stopped after {done} of {n} tasks")
    return time.perf_counter() - t0, sum(r.requests for r in reports.values())


class Reports:
    """An agent's completions on their way, as the SDK's worker sends them: one goes at once,
    alone; those its slots finish while it is in flight leave together once it is back, in one
    transaction (dispatch.task_report_batch_then_claim) whose `next` claims a task, started, for
    each slot they free."""

    def __init__(self, broker: Broker, agent_id: str) -> None:
        self.broker = broker
        self.agent_id = agent_id
        self.queue: asyncio.Queue[tuple[Task, asyncio.Future[Task | None]]] = asyncio.Queue()
        self.requests = 0

    async def complete(self, task: Task) -> Task | None:
        """Complete a started task; the next task of its slot (started), if one was claimed."""
        done: asyncio.Future[Task | None] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((task, done))
        return await done

    async def send(self) -> None:
        """Runs until cancelled: each request takes every completion waiting."""
        while True:
            waiting = [await self.queue.get()]
            while not self.queue.empty() and len(waiting) < MAX_REPORTS:
                waiting.append(self.queue.get_nowait())
            self.requests += 1
            try:
                await self._deliver(waiting)
            except Exception as exc:  # the slots waiting on it fail the drain
                for _, done in waiting:
                    if not done.done():
                        done.set_exception(exc)

    async def _deliver(self, waiting: list[tuple[Task, asyncio.Future[Task | None]]]) -> None:
        if len(waiting) == 1:
            task, done = waiting[0]
            done.set_result(await run_on(self.broker, self.agent_id, task))
            return
        items = [{"task_id": str(t.task_id), "action": "complete", "result": RESULT}
                 for t, _ in waiting]
        outcomes = await self.broker.report(
            self.agent_id, items,
            then=(len(items) - 1, NextClaim(max_tasks=len(items), start=True)))
        refused = [o for o in outcomes if o.status != 200]
        if refused:
            raise RuntimeError(f"a batch of completions refused: {refused[0]}")
        last = outcomes[-1]
        claimed = last.next if isinstance(last, ReportOutcomeWithNext) else []
        for i, (_, done) in enumerate(waiting):
            done.set_result(claimed[i] if i < len(claimed) else None)


async def drain_push(
    broker: Broker, agents: list[str], slots: int, n: int, batch: int, lat: Latencies
) -> tuple[float, int]:
    """One assigner calls task_assign in batches; each agent runs `slots` tasks at a time. A
    slot starts the task it is told of (an agent's NATS subject would tell it) and then keeps
    going on what each completion's next brings (the agent's own pushed tasks first); a pushed
    task a completion's next already started is not started twice. The agent's completions go
    as its Reports send them. Returns the seconds and the completion requests sent."""
    told: dict[str, asyncio.Queue[Assignment | None]] = {a: asyncio.Queue() for a in agents}
    reports = {a: Reports(broker, a) for a in agents}
    started: set[object] = set()
    freed = asyncio.Event()
    done = 0

    async def slot(agent_id: str) -> None:
        nonlocal done
        queue = told[agent_id]
        while (a := await queue.get()) is not None:
            if a.task_id in started:
                continue
            try:
                task: Task | None = await broker.apply(
                    Start(task_id=a.task_id, agent_id=agent_id))
            except Conflict:  # a completion's next started it first
                continue
            while task is not None:
                task = await reports[agent_id].complete(task)
                done += 1
                freed.set()
                if task is not None:
                    started.add(task.task_id)

    async def assigner() -> None:
        while done < n:  # run_engine's phase timeout bounds it
            freed.clear()
            t0 = time.perf_counter()
            got = await broker.assign(batch=batch)
            lat.add_since(t0)
            for a in got:
                told[a.agent_id].put_nowait(a)
            if not got:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(freed.wait(), 0.05)
        for queue in told.values():
            for _ in range(slots):
                queue.put_nowait(None)

    senders = [asyncio.create_task(r.send()) for r in reports.values()]
    t0 = time.perf_counter()
    try:
        await asyncio.gather(assigner(), *(slot(a) for a in agents for _ in range(slots)))
    finally:
        for sender in senders:
            sender.cancel()
    if done < n:
        raise RuntimeError(f"push drain stopped after {done} of {n} tasks")
    return time.perf_counter() - t0, sum(r.requests for r in reports.values())


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
        # As many agents as pgqueuer has consumers, each running as many tasks at a time as a
        # consumer's batch: the same batch size.
        agents = await register_agents(broker, mode, sizes.pgq_consumers, sizes.pgq_batch)
        cluster.checkpoint()
        before = read_counters(cluster.admin_url, dbname)
        meter = CpuMeter(cluster.postmaster)
        enqueue_s = await asyncio.wait_for(
            submit_all(broker, n, sizes.producers, flow=flow), sizes.phase_timeout
        )
        if mode == "pull":
            drain = drain_pull(broker, agents, sizes.pgq_batch, n, lat)
        else:
            drain = drain_push(broker, agents, sizes.pgq_batch, n, sizes.assign_batch, lat)
        drain_s, requests = await asyncio.wait_for(drain, sizes.phase_timeout)
        cpu = meter.stop()
    finally:
        await pool.close()
    await asyncio.sleep(0.2)
    after = read_counters(cluster.admin_url, dbname)
    cost = cost_between(cluster.admin_url, before, after)
    settings = (
        f"{len(agents)} agents x {sizes.pgq_batch} slots, pool {sizes.connections}, "
        + (f"task_assign batch {sizes.assign_batch}" if mode == "push"
           else "task_claim (started) for the idle slots")
        + f", completions in {requests:,} requests"
        " (those ready together in one, as the SDK's worker sends them)"
    )
    if flow:
        settings += (f", flow control: {len(FLOW_TENANTS)} tenants (2 weighted), every task under"
                     " one concurrency key and one rate key (limits not binding)")
    return Throughput(
        system=f"Dispatch engine ({mode}{', flow control' if flow else ''})", n=n,
        enqueue_s=enqueue_s, drain_s=drain_s,
        cost=cost, settings=settings + f", {sizes.producers} producers", claim_ms=lat.ms, cpu=cpu,
    )
