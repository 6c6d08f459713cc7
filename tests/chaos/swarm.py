"""The chaos suite's load: requesters and agents running full lifecycles over REST against a real
`dispatch serve`, recording every call and every acknowledgement.

A requester creates tasks with an Idempotency-Key; an agent finishes what it holds (pushed by the
assigner, or claimed and started in one step) and completes it with a result of its own. A 503 or
a dropped connection is retried the way a well-behaved client would: after Retry-After (capped, to
keep the suite short), with the same key or the same report. `created` and `completed` hold what
the server acknowledged; `calls` every call, with its status (None when no answer came)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from dispatch.sdk.client import LIMITS

CAPABILITY = "chaos"
LIMIT = 3


@dataclass
class Call:
    op: str
    started: float  # time.monotonic()
    ended: float
    status: int | None  # None: no HTTP answer (refused or dropped connection)
    retry_after: str | None = None
    error: str = ""


@dataclass
class Swarm:
    api: str
    agents: int = 4
    requesters: int = 2
    # Tasks a requester lets wait before creating more: the load stays steady, the drain short.
    backlog: int = 12
    retry_cap: float = 0.5
    calls: list[Call] = field(default_factory=list)
    created: dict[str, str] = field(default_factory=dict)  # task id -> idempotency key
    completed: dict[str, Any] = field(default_factory=dict)  # task id -> acknowledged result
    unexpected: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def agent_ids(self) -> list[str]:
        return [f"agent-{i}" for i in range(self.agents)]

    async def call(
        self, http: httpx.AsyncClient, op: str, method: str, url: str, ok: tuple[int, ...],
        **kwargs: Any,
    ) -> httpx.Response | None:
        """The request until it gets an answer other than 503 (or the swarm is told to give up):
        None when it never did."""
        while True:
            started = time.monotonic()
            try:
                r = await http.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                self.calls.append(Call(op, started, time.monotonic(), None, error=repr(exc)))
                if self.stop.is_set() and op == "create":
                    return None
                await asyncio.sleep(0.1)
                continue
            self.calls.append(
                Call(op, started, time.monotonic(), r.status_code, r.headers.get("Retry-After"))
            )
            if r.status_code == 503:
                if self.stop.is_set() and op == "create":
                    return None
                await asyncio.sleep(min(float(r.headers.get("Retry-After") or 1), self.retry_cap))
                continue
            if r.status_code not in ok:
                self.unexpected.append(f"{op} {url}: {r.status_code} {r.text[:300]}")
            return r

    async def requester(self, index: int) -> None:
        me = f"requester-{index}"
        async with httpx.AsyncClient(
            base_url=self.api, timeout=60, headers={"X-Agent-ID": me}, limits=LIMITS
        ) as http:
            n = 0
            while not self.stop.is_set():
                if len(self.created) - len(self.completed) >= self.backlog * self.requesters:
                    await asyncio.sleep(0.02)
                    continue
                key = f"{me}-{n}"
                r = await self.call(
                    http, "create", "POST", "/api/v1/tasks", (200, 201),
                    json={"title": f"chaos {key}", "required_capabilities": [CAPABILITY],
                          "metadata": {"key": key}},
                    headers={"Idempotency-Key": key},
                )
                if r is not None and r.status_code in (200, 201):
                    self.created[r.json()["task_id"]] = key
                    n += 1

    async def agent(self, me: str, *, drain: asyncio.Event) -> None:
        """Works until told to stop and (after `drain`) until nothing it could take is left."""
        async with httpx.AsyncClient(
            base_url=self.api, timeout=60, headers={"X-Agent-ID": me}, limits=LIMITS
        ) as http:
            await self.call(
                http, "register", "PUT", f"/api/v1/agents/{me}", (200,),
                json={"capabilities": [CAPABILITY], "max_concurrent": LIMIT},
            )
            done = 0
            while True:
                r = await self.call(
                    http, "held", "GET", "/api/v1/tasks", (200,),
                    params={"assignee": me, "status": "assigned,running", "limit": LIMIT},
                )
                held = r.json() if r is not None and r.status_code == 200 else []
                if not held:
                    if drain.is_set() and self.all_done():
                        return
                    r = await self.call(
                        http, "claim", "POST", "/api/v1/tasks/claim", (200, 204),
                        json={"wait_seconds": 0.5, "start": True},
                    )
                    if r is not None and r.status_code == 200:
                        held = [r.json()]
                for task in held:
                    task_id = task["task_id"]
                    if task["status"] == "assigned":
                        await self.call(
                            http, "start", "POST", f"/api/v1/tasks/{task_id}/start", (200,)
                        )
                    done += 1
                    result = {"agent": me, "n": done}
                    r = await self.call(
                        http, "complete", "POST", f"/api/v1/tasks/{task_id}/complete", (200,),
                        json={"result": result},
                    )
                    if r is not None and r.status_code == 200:
                        self.completed[task_id] = r.json()["result"]
                        if r.json()["result"] != result:
                            self.unexpected.append(f"complete {task_id}: {r.text[:300]}")

    def all_done(self) -> bool:
        return set(self.created) <= set(self.completed)

    @contextlib.asynccontextmanager
    async def running(self, drain_timeout: float = 90.0, *, finish: bool = True) -> Any:
        """Run the swarm for the block; on leaving it, stop creating and (with `finish`) let the
        agents finish every acknowledged task (within drain_timeout); without, just stop."""
        drain = asyncio.Event()
        agents = [asyncio.create_task(self.agent(a, drain=drain)) for a in self.agent_ids()]
        requesters = [asyncio.create_task(self.requester(i)) for i in range(self.requesters)]
        try:
            yield self
            if not finish:
                return
            self.stop.set()
            await asyncio.gather(*requesters)
            drain.set()
            async with asyncio.timeout(drain_timeout):
                await asyncio.gather(*agents)
        finally:
            self.stop.set()
            for t in (*agents, *requesters):
                t.cancel()
            await asyncio.gather(*agents, *requesters, return_exceptions=True)

    async def until(self, completed: int, timeout: float = 60.0) -> None:
        """Wait until at least `completed` more tasks were acknowledged as completed."""
        target = len(self.completed) + completed
        async with asyncio.timeout(timeout):
            while len(self.completed) < target:
                await asyncio.sleep(0.05)

    def answered(self, status: int | None) -> list[Call]:
        return [c for c in self.calls if c.status == status]
