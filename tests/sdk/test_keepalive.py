"""An agent that pauses about as long as serve keeps an idle connection open (a handler that runs
five seconds between its claim and its completion) gets an answer to its next request.

serve closes a keep-alive connection idle for server.keep_alive_ms (5 s). A client that keeps idle
connections exactly as long, as httpx does by default, sometimes sends its next request on a
connection serve is closing at that moment and gets "server disconnected" without an answer: here,
a few of these pauses in every hundred while serve is busy. The SDK gives up idle connections
sooner (CLIENT_IDLE_SECONDS)."""

from __future__ import annotations

import asyncio
import random

import httpx

from dispatch.sdk.client import AsyncDispatchClient
from dispatch.settings import ServerSettings
from tests.serve import ServeProcess

CLIENTS = 40
PAUSES = 3
KEEP_ALIVE = ServerSettings().keep_alive_ms / 1000


async def test_a_pause_as_long_as_the_servers_keep_alive_loses_no_request(
    sp: ServeProcess,
) -> None:
    failures: list[str] = []
    answered = 0
    busy = True

    async def pausing_agent(i: int) -> None:
        nonlocal answered
        async with AsyncDispatchClient(sp.api, f"agent-{i}") as client:
            for _ in range(PAUSES + 1):
                try:
                    await client.list(limit=1)
                    answered += 1
                except httpx.TransportError as exc:
                    failures.append(repr(exc))
                # Just under serve's keep-alive, where a client that keeps idle connections
                # as long as serve does would still reuse one.
                await asyncio.sleep(KEEP_ALIVE - 0.01 + random.uniform(-0.03, 0.03))

    async def load() -> None:
        """Other agents keeping serve's workers busy meanwhile."""
        async with AsyncDispatchClient(sp.api, "busy") as client:
            while busy:
                await client.list(limit=50)

    loading = [asyncio.create_task(load()) for _ in range(4)]
    try:
        await asyncio.gather(*(pausing_agent(i) for i in range(CLIENTS)))
    finally:
        busy = False
        await asyncio.gather(*loading)
    assert not failures, f"{len(failures)} of {CLIENTS * (PAUSES + 1)} requests: {failures[:3]}"
    assert answered == CLIENTS * (PAUSES + 1)
