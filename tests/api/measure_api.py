"""Quick throughput measurement of the REST API (not a test): requests/s for create and get against
one `dispatch serve` process, with N concurrent keep-alive clients for a few seconds each.

    .venv/bin/python -m tests.api.measure_api [--clients 32] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from tests import pg
from tests.serve import serving


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _phase(
    name: str, api: str, clients: int, seconds: float, ids: list[str], create: bool, pid: int
) -> None:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker(n: int) -> None:
        nonlocal errors
        headers = {"X-Agent-ID": f"bench-{n}"}
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=api, headers=headers, limits=limits) as http:
            while (start := time.perf_counter()) < stop_at:
                if create:
                    r = await http.post("/api/v1/tasks", json={"title": "t", "scope": "none"})
                    if r.status_code == 201:
                        ids.append(r.json()["task_id"])
                else:
                    r = await http.get(f"/api/v1/tasks/{random.choice(ids)}")
                latencies.append(time.perf_counter() - start)
                errors += r.status_code >= 400

    began, cpu = time.perf_counter(), _cpu_seconds(pid)
    await asyncio.gather(*(worker(n) for n in range(clients)))
    elapsed, cpu = time.perf_counter() - began, _cpu_seconds(pid) - cpu
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    print(
        f"{name:6} {len(latencies) / elapsed:8.0f} req/s"
        f"  p50 {p(0.5):6.1f} ms  p99 {p(0.99):6.1f} ms"
        f"  mean {statistics.fmean(latencies) * 1000:6.1f} ms  errors {errors}"
        f"  serve CPU {cpu / max(len(latencies), 1) * 1e6:5.0f} us/request"
        f"  ({len(latencies)} requests, {clients} clients, {elapsed:.1f} s)"
    )


async def _measure(api: str, clients: int, seconds: float, pid: int) -> None:
    ids: list[str] = []
    await _phase("warmup", api, clients, 1.0, ids, True, pid)
    await _phase("create", api, clients, seconds, ids, True, pid)
    await _phase("get", api, clients, seconds, ids, False, pid)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    print(f"cpus {os.cpu_count()}, load average before {os.getloadavg()}")
    with pg.server_url() as server, tempfile.TemporaryDirectory() as tmp:
        pg.create_template(server)
        url = pg.clone_database(server)
        env = {"DISPATCH_LOG_LEVEL": "warning"}
        with serving(url, Path(tmp), env=env) as sp:
            asyncio.run(_measure(sp.api, args.clients, args.seconds, sp.proc.pid))


if __name__ == "__main__":
    main()
