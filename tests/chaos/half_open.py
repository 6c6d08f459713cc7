"""Run inside a network namespace of its own (`unshare --net`, see test_half_open.py): a throwaway
PostgreSQL on its loopback, Dispatch's pool and LISTEN connection to it over TCP, then the
loopback taken down, so that both connections go half-open (no packet passes, no reset arrives),
then up again. Prints one JSON object with what happened."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import psycopg

from dispatch.db import create_pool
from dispatch.errors import Unavailable
from dispatch.migrate import migrate
from dispatch.notify import WORK_CHANNEL, Listener
from dispatch.store import Store
from tests import pgdist

# Twice the half-open bound that Dispatch's connections are given (about 30 s): what is
# still waiting then is hung.
HUNG = 60.0


def loopback(state: str) -> None:
    subprocess.run(["ip", "link", "set", "lo", state], check=True)


async def woken(url: str, listener: Listener) -> bool:
    """Whether a NOTIFY from another session reaches the listener."""
    event = listener.event(WORK_CHANNEL)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(f"NOTIFY {WORK_CHANNEL}")
    try:
        await asyncio.wait_for(event.wait(), 10)
    except TimeoutError:
        return False
    return True


async def until(check, deadline: float) -> float | None:  # type: ignore[no-untyped-def]
    """Seconds until check() is true, polling; None past the deadline."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline:
        try:
            if await check():
                return round(time.monotonic() - t0, 1)
        except (psycopg.Error, Unavailable, OSError):
            pass
        await asyncio.sleep(0.5)
    return None


async def scenario(url: str) -> dict[str, object]:
    out: dict[str, object] = {}
    pool = create_pool(url)
    await pool.open(wait=True)
    store = Store(pool)
    listener = Listener(url, channels=(WORK_CHANNEL,))
    await listener.start()
    try:
        await store.agents.upsert("agent-1")
        out["woken_before"] = await woken(url, listener)

        loopback("down")
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(HUNG):
                await store.agents.upsert("agent-1")
            out["request"] = "answered"
        except Unavailable as exc:
            out["request"] = f"unavailable ({exc.status})"
        except TimeoutError:
            out["request"] = "hung"
        out["request_seconds"] = round(time.monotonic() - t0, 1)

        async def listener_lost() -> bool:
            return not listener.connected.is_set()

        out["listener_lost_seconds"] = await until(listener_lost, HUNG)

        loopback("up")

        async def serves() -> bool:
            await store.agents.upsert("agent-1")
            return True

        out["request_after_seconds"] = await until(serves, 60)

        async def listens() -> bool:
            return listener.connected.is_set() and await woken(url, listener)

        out["woken_after_seconds"] = await until(listens, 60)
    finally:
        loopback("up")
        await listener.stop()
        await pool.close()
    return out


def main() -> None:
    loopback("up")  # a new network namespace starts with it down
    with pgdist.cluster() as admin_url:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE half_open")
        url = admin_url.rsplit("/", 1)[0] + "/half_open"
        migrate(url)
        print(json.dumps(asyncio.run(scenario(url))), flush=True)


if __name__ == "__main__":
    main()
