"""Create -> assigned latency of a real `dispatch serve` (not a test: a measurement).

    .venv/bin/python -m tests.engine.measure_latency --rate 100 --seconds 10

Starts a Postgres (as the test suite does), one serve process, registers idle agents over REST,
creates tasks over REST at a steady rate, then reads p50/p99 of (assigned event - created event)
from the event log."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import psycopg

from dispatch.db import CONNECT_KWARGS
from tests import pg
from tests.serve import serving

_LATENCY = """
SELECT extract(epoch FROM a.created_at - c.created_at) * 1000 AS ms
FROM dispatch.task_events c
JOIN dispatch.task_events a ON a.task_id = c.task_id AND a.event = 'assigned'
WHERE c.event = 'created'
ORDER BY 1
"""


async def drive(api: str, rate: float, seconds: float, agents: int) -> int:
    async with httpx.AsyncClient(base_url=api, timeout=30) as http:
        for i in range(agents):
            r = await http.put(
                f"/api/v1/agents/idle-{i}", json={"capabilities": ["work"], "max_concurrent": 1000},
                headers={"X-Agent-ID": f"idle-{i}"},
            )
            r.raise_for_status()
        total = int(rate * seconds)
        start = time.perf_counter()
        pending: set[asyncio.Task[httpx.Response]] = set()
        for n in range(total):
            delay = start + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t = asyncio.create_task(http.post(
                "/api/v1/tasks", json={"title": f"t{n}", "required_capabilities": ["work"]},
                headers={"X-Agent-ID": "requester"},
            ))
            pending.add(t)
            t.add_done_callback(pending.discard)
        for r in await asyncio.gather(*pending):
            r.raise_for_status()
        return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--agents", type=int, default=5)
    args = parser.parse_args()
    with pg.server_url() as server:
        pg.create_template(server)
        url = pg.clone_database(server)
        try:
            with tempfile.TemporaryDirectory() as tmp, serving(
                url, Path(tmp), env={"DISPATCH_LOG_LEVEL": "warning"},
            ) as sp:
                total = asyncio.run(drive(sp.api, args.rate, args.seconds, args.agents))
                deadline = time.monotonic() + 30
                with psycopg.connect(url, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
                    while True:
                        ms = [float(r[0]) for r in conn.execute(_LATENCY).fetchall()]
                        if len(ms) >= total or time.monotonic() > deadline:
                            break
                        time.sleep(0.1)
        finally:
            pg.drop_database(server, url)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    print(
        f"{len(ms)}/{total} tasks assigned at {args.rate:.0f} tasks/s over {args.seconds:.0f} s, "
        f"{args.agents} idle agents: create->assigned p50 {statistics.median(ms):.2f} ms, "
        f"p90 {q[89]:.2f} ms, p99 {q[98]:.2f} ms, max {max(ms):.2f} ms"
    )


if __name__ == "__main__":
    main()
