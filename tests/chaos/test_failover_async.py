"""The primary dies while its asynchronous standby is behind, and the standby is promoted: what the
primary wrote meanwhile is lost, though its relay had published the events and an agent held a
task on its lease. `dispatch serve` runs on one URL naming both servers and is not restarted.

What must hold: the new primary hands out the lost event ids again, and its events still reach
the stream (their message ids carry created_at), the relay's backlog drains; the task comes back
pending, and the agent that holds it now is told apart from the one that held it on the lost
history: a report on the lost lease is 409, the new holder's report goes through. The walsender
is frozen (SIGSTOP) so that the standby misses a known stretch of work. Needs the distribution's
PostgreSQL (streaming replication)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import nats
import psycopg
import pytest
from psycopg.rows import dict_row

from dispatch.db import CONNECT_KWARGS
from dispatch.events.relay import MSG_ID_HEADER
from dispatch.events.schemas import ORIGIN_HEADER, ORIGIN_RELAY
from dispatch.sdk.client import LIMITS
from tests.events.streamread import read_stream
from tests.natsfix import NatsServer
from tests.pgrepl import Pair, async_pair
from tests.serve import serving

# More events than the 32 sequence values Postgres logs ahead (SEQ_LOG_VALS): the standby's
# sequence cannot have skipped past what the lost stretch used, so ids are handed out again.
LOST_TASKS = 15
AFTER_TASKS = 15


@pytest.fixture
def pair() -> Iterator[Pair]:
    if os.environ.get("DISPATCH_TEST_PG") != "distribution":
        pytest.skip("streaming replication runs on the distribution build (DISPATCH_TEST_PG)")
    with async_pair() as p:
        yield p


def rows(url: str, query: str, *args: object) -> list[dict[str, Any]]:
    with psycopg.connect(url, row_factory=dict_row,
                         **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
        return conn.execute(query, args).fetchall()


def unpublished(url: str) -> int:
    return int(rows(url, "SELECT count(*) AS n FROM dispatch.task_events"
                         " WHERE published_at IS NULL")[0]["n"])


def msg_id(e: dict[str, Any]) -> str:
    micros = (e["created_at"] - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    return f"{e['id']}.{micros}"


class Agent:
    """One agent's HTTP calls, retried while the server answers 503 (its database is failing
    over) or cannot be reached."""

    def __init__(self, api: str, agent_id: str) -> None:
        self.agent_id = agent_id
        self.http = httpx.AsyncClient(base_url=api, timeout=30, limits=LIMITS,
                                      headers={"X-Agent-ID": agent_id})

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async with asyncio.timeout(45):
            while True:
                try:
                    r = await self.http.request(method, path, **kwargs)
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
                    continue
                if r.status_code != 503:
                    return r
                await asyncio.sleep(0.1)

    async def register(self, capability: str) -> None:
        r = await self.call("PUT", f"/api/v1/agents/{self.agent_id}",
                            json={"capabilities": [capability], "max_concurrent": 50})
        assert r.status_code == 200, r.text

    async def create(self, title: str, capability: str) -> str:
        r = await self.call("POST", "/api/v1/tasks",
                            json={"title": title, "required_capabilities": [capability]})
        assert r.status_code == 201, r.text
        return str(r.json()["task_id"])

    async def take(self) -> dict[str, Any]:
        """The next task the agent may run, started (claimed, or pushed by the assigner)."""
        r = await self.call("POST", "/api/v1/tasks/claim", json={"wait_seconds": 5})
        assert r.status_code == 200, r.text
        task: dict[str, Any] = r.json()
        r = await self.call("POST", f"/api/v1/tasks/{task['task_id']}/start",
                            json={"lease": task["lease"]})
        assert r.status_code == 200, r.text
        return task

    async def work(self, count: int) -> None:
        for _ in range(count):
            task = await self.take()
            r = await self.call("POST", f"/api/v1/tasks/{task['task_id']}/complete",
                                json={"result": {"by": self.agent_id}, "lease": task["lease"]})
            assert r.status_code == 200, r.text


@pytest.mark.timeout(150)
async def test_an_async_standby_promoted_behind_loses_no_event_and_fences_the_lost_lease(
    pair: Pair, nats_server: NatsServer, tmp_path: Path
) -> None:
    started = time.monotonic()
    env = {"DISPATCH_HERMES_URL": nats_server.url, "DISPATCH_LOG_LEVEL": "warning"}
    with serving(pair.url, tmp_path, env=env) as sp:
        req, worker, holder = (Agent(sp.api, a) for a in ("req", "agent-w", "agent-x"))
        try:
            # Replicated: the worker's first tasks, and the task `held` nobody can take yet.
            await worker.register("w")
            for i in range(3):
                await req.create(f"before {i}", "w")
            await worker.work(3)
            held = await req.create("held", "x")
            await asyncio.to_thread(pair.wait_caught_up)

            # The lost stretch: agent-x takes `held` on lease L, the worker does more; the relay
            # publishes all of it; the standby gets none of it.
            with pair.frozen_walsender():
                await holder.register("x")
                lost = await holder.take()
                assert lost["task_id"] == held
                for i in range(LOST_TASKS):
                    await req.create(f"lost {i}", "w")
                await worker.work(LOST_TASKS)
                while unpublished(pair.primary_url):
                    await asyncio.sleep(0.05)
                published_lost = rows(pair.primary_url,
                                      "SELECT id, created_at FROM dispatch.task_events")
                assert await asyncio.to_thread(pair.behind)
                await asyncio.to_thread(pair.crash_primary)
            await asyncio.to_thread(pair.promote)
            failed_over = time.monotonic()

            # The same serve, the new primary: `held` is pending again, the lost stretch gone.
            [again] = rows(pair.standby_url, "SELECT status::text, lease FROM dispatch.tasks"
                                             " WHERE task_id = %s", held)
            assert again == {"status": "pending", "lease": 0}
            await worker.register("w")  # its registration stands; the lost stretch's writes not
            await holder.register("x")
            now = await holder.take()  # the same agent takes it again
            assert now["task_id"] == held and now["lease"] != lost["lease"]
            for i in range(AFTER_TASKS):
                await req.create(f"after {i}", "w")
            await worker.work(AFTER_TASKS)

            # The agent's late report from the lost history names the lost lease: 409.
            r = await holder.call("POST", f"/api/v1/tasks/{held}/complete",
                                  json={"result": {"from": "lost"}, "lease": lost["lease"]})
            assert r.status_code == 409, r.text
            assert r.json()["detail"]["lease"] == now["lease"]
            r = await holder.call("POST", f"/api/v1/tasks/{held}/complete",
                                  json={"result": {"from": "now"}, "lease": now["lease"]})
            assert r.status_code == 200 and r.json()["result"] == {"from": "now"}, r.text

            # Every event of the surviving history reaches the stream; the backlog drains.
            deadline = time.monotonic() + 30
            while unpublished(pair.standby_url):
                assert time.monotonic() < deadline, "the relay never drained its backlog"
                await asyncio.sleep(0.1)
            async with httpx.AsyncClient(timeout=10) as http:
                health = (await http.get(f"{sp.ops}/health")).json()
        finally:
            for a in (req, worker, holder):
                await a.http.aclose()
    surviving = rows(pair.standby_url, "SELECT id, created_at FROM dispatch.task_events")
    nc = await nats.connect(nats_server.url)
    try:
        stored = [m for m in await read_stream(nc) if m.headers.get(ORIGIN_HEADER) == ORIGIN_RELAY]
    finally:
        await nc.close()
    in_stream = {m.headers[MSG_ID_HEADER]: m.body for m in stored}
    # Every event of the surviving history is in the stream under its message id: that event, not
    # the lost history's event of the same id.
    missing = [e["id"] for e in surviving if msg_id(e) not in in_stream
               or datetime.fromisoformat(in_stream[msg_id(e)]["at"]) != e["created_at"]]
    assert not missing, f"events of the surviving history not in the stream: {missing[:5]}"
    assert all(msg_id(e) in in_stream for e in published_lost)
    # The point of the exercise: the new primary did hand out ids the lost history had published.
    lost_at = {e["id"]: e["created_at"] for e in published_lost}
    reissued = [e["id"] for e in surviving
                if e["id"] in lost_at and lost_at[e["id"]] != e["created_at"]]
    assert reissued, "no event id was handed out twice: the failover lost nothing"
    assert health["event_relay"] == "ok" and "event_id_conflicts" not in health, health
    elapsed = time.monotonic() - started
    print(f"\n{len(reissued)} event ids handed out again after the failover;"
          f" {time.monotonic() - failed_over:.1f} s from promotion to the end;"
          f" {elapsed:.1f} s in all")
    assert elapsed < 90
