"""Postgres stopped for a few seconds and started again under load, `dispatch serve` left running.

What must hold: during the outage requests are answered 503 with Retry-After (or wait for the
database within the pool's bound) and /health says the database is down; every request that
starts once Postgres accepts connections again succeeds, without restarting serve; afterwards
/health is ok; nothing acknowledged is lost, active counts and the history stay sound."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from dispatch.db import CONNECT_KWARGS
from dispatch.settings import DatabaseSettings
from tests.chaos.checks import all_invariants
from tests.chaos.conftest import Restartable
from tests.chaos.swarm import Swarm
from tests.serve import serving

POOL_WAIT = DatabaseSettings().pool_timeout_ms / 1000
LOOPS = ("assigner", "reaper", "directory")


async def health(ops: str) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.get(f"{ops}/health")
        return r.status_code, r.json()


@pytest.mark.parametrize(
    "outage",
    [3.0, POOL_WAIT + 5],
    ids=["shorter-than-the-pool-wait", "longer-than-the-pool-wait"],
)
async def test_postgres_restarted_under_load(
    restartable_postgres: Restartable, tmp_path: Path, outage: float
) -> None:
    pg = restartable_postgres
    with serving(pg.url, tmp_path, env={"DISPATCH_LOG_LEVEL": "warning"}) as sp:
        swarm = Swarm(sp.api)
        async with swarm.running():
            await swarm.until(completed=20)
            down = time.monotonic()
            await asyncio.to_thread(pg.stop)
            status, report = await health(sp.ops)
            assert status == 503 and report["database"] == "down", report
            await asyncio.sleep(outage)
            await asyncio.to_thread(pg.start)
            up = time.monotonic()
            await swarm.until(completed=30, timeout=90)  # work resumes: the same serve process
            # /health is ok again, and every loop that met the outage has recovered by itself.
            async with asyncio.timeout(60):
                while True:
                    status, report = await health(sp.ops)
                    if status == 200 and all(report[k] == "ok" for k in LOOPS):
                        break
                    await asyncio.sleep(0.1)
            assert report["database"] == "ok", report

    failed = swarm.answered(503)
    waited = [c for c in swarm.calls if c.started < up < c.ended and c.status != 503]
    print(
        f"\noutage {up - down:.1f} s; {len(swarm.calls)} requests, {len(failed)} answered 503,"
        f" {len(waited)} waited for the database and succeeded, {len(swarm.completed)} tasks"
        " completed"
    )
    assert any(down < c.started < up for c in swarm.calls), "no request met the outage"
    late = [c for c in failed if c.started > up]
    assert not late, f"503 for requests made after Postgres was back: {late[:3]}"
    assert not swarm.answered(None), swarm.answered(None)[:3]
    with psycopg.connect(pg.url, row_factory=dict_row, **CONNECT_KWARGS) as sql:  # type: ignore[arg-type]
        all_invariants(sql, swarm)
