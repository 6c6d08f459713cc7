"""Over HTTP: create->assigned latency at a fixed create rate, the full REST lifecycle with
concurrent agents, the trivial Litestar ceiling, and the serve process's peak RSS."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from bench.common import Latencies, Sizes, percentile
from bench.cpu import CpuSplit, postgres_seconds, self_seconds, tree_seconds
from bench.http import Connection, Response
from bench.pg import Cluster, Cost, cost_between, prepare_dispatch, read_counters
from bench.serve import ADMIN_TOKEN, RssSampler, dispatch_serve, trivial_serve

REQUESTER = "bench-requester"
API = "/api/v1"
# How long an agent's completion waits for its next task when there is none yet.
NEXT_WAIT_SECONDS = 0.5


def _expect(resp: Response, what: str, *ok: int) -> Response:
    if resp.status in ok:
        return resp
    raise RuntimeError(f"{what} answered {resp.status}: {resp.body[:300]!r}")


async def _register(base: str, agent_id: str, max_concurrent: int) -> None:
    """As an operator registers an agent for a tenant: naming its owner takes the admin token."""
    conn = Connection(base, {"X-Agent-ID": agent_id, "Authorization": f"Bearer {ADMIN_TOKEN}"})
    try:
        resp = await conn.request(
            "PUT", f"{API}/agents/{agent_id}",
            {"capabilities": [], "owner": REQUESTER, "max_concurrent": max_concurrent},
        )
        _expect(resp, "PUT /agents/{id}", 200, 201)
    finally:
        await conn.close()


def start_profiler(pid: int) -> subprocess.Popen[bytes] | None:
    """BENCH_PYSPY=FILE: sample the serve process with py-spy (collapsed stacks) during the REST
    lifecycle; py-spy must be installed (it is not a bench dependency)."""
    out = os.environ.get("BENCH_PYSPY", "").strip()
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not out or not Path(exe).exists():
        return None
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--subprocesses", "--format", "raw", "--rate", "250",
         "--nonblocking",
         "--output", out],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def stop_profiler(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# -- 1. create -> assigned latency -----------------------------------------------------------------


@dataclass
class LatencyResult:
    rate: int
    seconds: float
    sent: int
    measured: int
    assigned_ms: list[float]
    post_ms: list[float]
    late_sends: int


async def run_latency(cluster: Cluster, sizes: Sizes) -> LatencyResult:
    """Open-loop creates at BENCH_LATENCY_RATE per second for BENCH_LATENCY_SECONDS against idle
    agents with room for every task; created->assigned from the event log (the first second is
    warm-up and left out)."""
    dbname = "rest_latency"
    url = cluster.create_database(dbname)
    await asyncio.to_thread(prepare_dispatch, url)
    rate, seconds = sizes.latency_rate, sizes.latency_seconds
    total = int(rate * seconds)
    with dispatch_serve(url) as serve:
        agents = 4
        room = min(1000, total // agents + 10)
        for i in range(agents):
            await _register(serve.base, f"idle-{i}", room)
        free: asyncio.Queue[Connection] = asyncio.Queue()
        for _ in range(32):
            free.put_nowait(Connection(serve.base, {"X-Agent-ID": REQUESTER}))
        ids: list[tuple[float, str]] = []
        post = Latencies()
        late = 0
        pending: set[asyncio.Task[None]] = set()

        async def create(i: int, sent_at: float) -> None:
            conn = await free.get()
            try:
                t0 = time.perf_counter()
                resp = await conn.request("POST", f"{API}/tasks", {"title": f"latency {i}"})
                post.add_since(t0)
                body = _expect(resp, "POST /tasks", 201).json()
                assert isinstance(body, dict)
                ids.append((sent_at, str(body["task_id"])))
            finally:
                free.put_nowait(conn)

        t_start = time.perf_counter()
        for i in range(total):
            target = t_start + i / rate
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.005:
                late += 1
            task = asyncio.create_task(create(i, target - t_start))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.wait_for(asyncio.gather(*pending), 30)
        while not free.empty():
            await free.get_nowait().close()
        measured_ids = [uuid.UUID(tid) for sent, tid in ids if sent >= 1.0]
        # Wait (bounded) until every measured task has its `assigned` event.
        rows: list[tuple[float]] = []
        deadline = time.monotonic() + 30
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                cur = await conn.execute(
                    "SELECT extract(epoch FROM a.created_at - c.created_at) * 1000"
                    " FROM dispatch.task_events c JOIN dispatch.task_events a"
                    "   ON a.task_id = c.task_id AND a.event = 'assigned'"
                    " WHERE c.event = 'created' AND c.task_id = ANY (%s)",
                    (measured_ids,),
                )
                rows = await cur.fetchall()
                if len(rows) >= len(measured_ids):
                    break
                await asyncio.sleep(0.5)
    return LatencyResult(
        rate=rate, seconds=seconds, sent=len(ids), measured=len(rows),
        assigned_ms=[float(r[0]) for r in rows], post_ms=post.ms, late_sends=late,
    )


# -- 2. full lifecycle over REST, 4. its cost, 6. peak RSS ---------------------------------


@dataclass
class RestResult:
    n: int
    seconds: float
    agents: int
    producers: int
    requests: dict[str, int]
    cost: Cost
    peak_rss_kb: int
    hwm_kb: int
    idle_rss_kb: int
    claimed: int = 0  # tasks a claim returned
    handed: int = 0  # tasks a completion's `next` returned
    pushed: int = 0  # tasks the assigner gave (then fetched by the agent's claim or `next`)
    create_ms: list[float] = field(default_factory=list)
    latency_ms: dict[str, list[float]] = field(default_factory=dict)
    cpu: CpuSplit | None = None

    @property
    def rate(self) -> float:
        return self.n / self.seconds if self.seconds else 0.0

    @property
    def request_rate(self) -> float:
        return sum(self.requests.values()) / self.seconds if self.seconds else 0.0


async def run_rest_lifecycle(cluster: Cluster, sizes: Sizes) -> RestResult:
    """Requesters create as fast as they can; each agent (own connection) works as the protocol
    lets an agent on one connection work: a claim that starts what it takes (the tasks the
    assigner pushed to it first, then new ones), then for each task one completion that claims
    and starts its next task in the same request, waiting for one when there is none yet. Ends
    when all N tasks are completed; timed until the last completion's commit."""
    dbname = "rest_lifecycle"
    url = cluster.create_database(dbname)
    await asyncio.to_thread(prepare_dispatch, url)
    n = sizes.rest_tasks
    counts: dict[str, int] = {"create": 0, "claim": 0, "complete": 0}
    lat: dict[str, Latencies] = {k: Latencies() for k in counts}
    # A completion's own latency, from its request to its commit (its completed_at, the same
    # clock): "complete" runs to the answer, which includes the wait of a `next` that found none.
    committed = lat["complete-commit"] = Latencies()
    create_lat = lat["create"]
    with dispatch_serve(url) as serve:
        agent_ids = [f"rest-{i:03d}" for i in range(sizes.rest_agents)]
        for a in agent_ids:
            await _register(serve.base, a, 1)
        idle_rss = serve.rss_kb()
        cluster.checkpoint()
        before = read_counters(cluster.admin_url, dbname)
        sampler = RssSampler(serve.proc.pid)
        sampler.start()
        profiler = start_profiler(serve.proc.pid)
        pm = cluster.postmaster
        cpu0 = (tree_seconds(serve.proc.pid), postgres_seconds(pm), self_seconds())
        created = iter(range(n))
        completed = 0
        claimed = handed = 0
        # Wall clock, as the database's: a completion whose `next` waits answers after its
        # commit, so the phase ends at the last completion's commit (its completed_at).
        began = time.time()
        last_done = began
        deadline = time.monotonic() + sizes.phase_timeout

        async def producer() -> None:
            conn = Connection(serve.base, {"X-Agent-ID": REQUESTER})
            try:
                for i in created:
                    t0 = time.perf_counter()
                    resp = await conn.request("POST", f"{API}/tasks", {"title": f"rest {i}"})
                    create_lat.add_since(t0)
                    counts["create"] += 1
                    _expect(resp, "POST /tasks", 201)
            finally:
                await conn.close()

        async def agent(agent_id: str) -> None:
            nonlocal completed, claimed, handed, last_done
            conn = Connection(serve.base, {"X-Agent-ID": agent_id})
            task: dict[str, Any] | None = None
            try:
                while completed < n and time.monotonic() < deadline:
                    if task is None:
                        t0 = time.perf_counter()
                        resp = await conn.request(
                            "POST", f"{API}/tasks/claim", {"start": True, "wait_seconds": 0.5})
                        lat["claim"].add_since(t0)
                        counts["claim"] += 1
                        if _expect(resp, "POST /tasks/claim", 200, 204).status == 204:
                            continue
                        got = resp.json()
                        assert isinstance(got, dict)
                        task = got
                        claimed += 1
                    assert isinstance(task, dict)
                    t0, sent = time.perf_counter(), time.time()
                    r = await conn.request(
                        "POST", f"{API}/tasks/{task['task_id']}/complete",
                        {"result": {"ok": True},
                         "next": {"start": True, "wait_seconds": NEXT_WAIT_SECONDS}},
                    )
                    lat["complete"].add_since(t0)
                    counts["complete"] += 1
                    body = _expect(r, "POST /tasks/{id}/complete", 200).json()
                    completed += 1
                    assert isinstance(body, dict)
                    done_at = datetime.fromisoformat(str(body["completed_at"])).timestamp()
                    committed.ms.append(max(done_at - sent, 0.0) * 1000)
                    last_done = max(last_done, done_at)
                    following = body.get("next") or []
                    assert isinstance(following, list)
                    task = None
                    if following and isinstance(following[0], dict):
                        task = following[0]
                    handed += bool(following)
            finally:
                await conn.close()

        await asyncio.gather(
            *(producer() for _ in range(sizes.rest_producers)),
            *(agent(a) for a in agent_ids),
        )
        # Until the last completion: agents still in a claim's wait at the end do not count.
        seconds = last_done - began
        cpu = CpuSplit(
            seconds, tree_seconds(serve.proc.pid) - cpu0[0], postgres_seconds(pm) - cpu0[1],
            self_seconds() - cpu0[2],
        )
        peak, hwm = sampler.stop()
        stop_profiler(profiler)
        if completed < n:
            raise RuntimeError(f"REST lifecycle completed {completed} of {n} in time")
    # serve has stopped: its connections flushed their statistics.
    await asyncio.sleep(0.2)
    cost = cost_between(cluster.admin_url, before, read_counters(cluster.admin_url, dbname))
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as db:
        cur = await db.execute(
            "SELECT count(*) FROM dispatch.task_events"
            " WHERE event = 'assigned' AND payload->>'mode' <> 'claim'")
        [(pushed,)] = await cur.fetchall()
    return RestResult(
        n=n, seconds=seconds, agents=sizes.rest_agents, producers=sizes.rest_producers,
        requests=counts, cost=cost, peak_rss_kb=peak, hwm_kb=hwm, idle_rss_kb=idle_rss,
        claimed=claimed, handed=handed, pushed=pushed, create_ms=create_lat.ms,
        latency_ms={k: v.ms for k, v in lat.items()}, cpu=cpu,
    )


# -- the ceiling ------------------------------------------------------------------------------


@dataclass
class CeilingResult:
    requests: int
    seconds: float
    connections: int
    p99_ms: float
    cpu_s: float = 0.0  # the trivial server's CPU over the timed requests

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_request(self) -> float:
        return 1e6 * self.cpu_s / self.requests if self.requests else 0.0


async def run_ceiling(sizes: Sizes) -> CeilingResult:
    """Closed loop on POST /echo with as many connections as the REST lifecycle uses."""
    connections = sizes.rest_agents + sizes.rest_producers
    lat = Latencies()
    with trivial_serve() as app:
        stop_at = time.perf_counter() + sizes.ceiling_seconds
        done = 0

        async def client() -> None:
            nonlocal done
            conn = Connection(app.base, {"X-Agent-ID": REQUESTER})
            try:
                # warm-up request, not counted
                await conn.request("POST", "/echo", {"title": "warm"})
                while time.perf_counter() < stop_at:
                    t0 = time.perf_counter()
                    resp = await conn.request("POST", "/echo", {"title": "ceiling"})
                    lat.add_since(t0)
                    if resp.status != 200:
                        raise RuntimeError(f"/echo answered {resp.status}")
                    done += 1
            finally:
                await conn.close()

        t0, cpu0 = time.perf_counter(), tree_seconds(app.proc.pid)
        await asyncio.gather(*(client() for _ in range(connections)))
        seconds, cpu = time.perf_counter() - t0, tree_seconds(app.proc.pid) - cpu0
    # The warm-up requests are in the CPU and not in the count: one per connection.
    return CeilingResult(done, seconds, connections, percentile(lat.ms, 99), cpu)
