"""The primary dies under load and its synchronous standby is promoted; `dispatch serve` runs on
one URL naming both (target_session_attrs=read-write) and is not restarted.

What must hold: nothing the server acknowledged is lost (every commit waited for the standby), no
task is assigned twice, every agent's load matches its slots, work resumes on the new primary by
itself and /health is ok again. Needs the distribution's PostgreSQL (streaming replication)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from dispatch.db import CONNECT_KWARGS
from tests import pgrepl
from tests.chaos.checks import all_invariants
from tests.chaos.swarm import Swarm
from tests.serve import serving

LOOPS = ("assigner", "reaper", "directory")


@pytest.fixture
def sync_pair() -> Iterator[pgrepl.Pair]:
    """A primary whose every commit waits for its streaming standby, with a migrated database
    `dispatch`."""
    if os.environ.get("DISPATCH_TEST_PG") != "distribution":
        pytest.skip("streaming replication runs on the distribution build (DISPATCH_TEST_PG)")
    with pgrepl.async_pair(settings={"synchronous_commit": "on"}) as pair, \
            psycopg.connect(pair.primary.url, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
        conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        conn.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 30
        while conn.execute(
            "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
        ).fetchone() != (1,):
            assert time.monotonic() < deadline, "the standby never became synchronous"
            time.sleep(0.1)
        yield pair


async def healthy(ops: str) -> dict[str, object]:
    async with httpx.AsyncClient(timeout=30) as http, asyncio.timeout(60):
        while True:
            r = await http.get(f"{ops}/health")
            report = r.json()
            if r.status_code == 200 and all(report.get(k) == "ok" for k in LOOPS):
                return dict(report)
            await asyncio.sleep(0.1)


async def test_the_primary_dies_and_its_synchronous_standby_takes_over(
    sync_pair: pgrepl.Pair, tmp_path: Path
) -> None:
    primary, standby = sync_pair.primary, sync_pair.standby
    with serving(sync_pair.url, tmp_path, env={"DISPATCH_LOG_LEVEL": "warning"}) as sp:
        swarm = Swarm(sp.api)
        async with swarm.running():
            await swarm.until(completed=30)
            before = len(swarm.completed)
            await asyncio.to_thread(primary.stop, "immediate")
            killed = time.monotonic()
            await asyncio.to_thread(standby.promote)
            promoted = time.monotonic()
            await swarm.until(completed=before + 40, timeout=90)  # the same serve, new primary
            await healthy(sp.ops)
            # A task created now is assigned by the assigner woken by NOTIFY on the new primary.
            resumed = time.monotonic()
    print(f"\npromotion took {promoted - killed:.1f} s; 40 more tasks completed"
          f" {resumed - promoted:.1f} s after it; {len(swarm.created)} created,"
          f" {len(swarm.completed)} completed, {len(swarm.answered(503))} answers of 503")
    assert any(killed < c.started for c in swarm.calls if c.status in (200, 201))
    with psycopg.connect(sync_pair.standby_url, row_factory=dict_row,
                         **CONNECT_KWARGS) as sql:  # type: ignore[arg-type]
        all_invariants(sql, swarm)
