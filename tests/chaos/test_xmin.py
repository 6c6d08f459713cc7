"""A transaction holding back the xmin horizon (a forgotten psql session, a long report, a replica's
hot_standby_feedback) during a soak of lifecycles over REST.

While it is held, no dead row version can be removed: the tasks' and the agents' (an assigner
round notes when it gave each agent work, a claim notes its agent as seen at most once a second)
pile up. What must hold: the broker keeps working, claims stay free of pathology (p99 under a
generous bound; the numbers are printed), and once the transaction ends and vacuum runs, the dead
tuples are gone and stop growing.

Claims are timed by a probe agent whose capability no task asks for: the assigner never pushes it
anything, so each of its claims (wait_seconds 0, answered 204 at once) walks the whole pending
queue, dead index entries included: the claim's worst case.

DISPATCH_CHAOS_XMIN_SECONDS sets how long the horizon is held: 60 s by default, to keep the suite
within its time in CI; the README reports a longer run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from dispatch.db import CONNECT_KWARGS
from tests.chaos.checks import all_invariants
from tests.chaos.swarm import Swarm
from tests.serve import serving

Sql = psycopg.Connection[dict[str, Any]]
HOLD_SECONDS = float(os.environ.get("DISPATCH_CHAOS_XMIN_SECONDS", "60"))
SAMPLE_SECONDS = 15.0
# No pathology: a claim that walks dead index entries and long update chains may slow down, but
# must not take anywhere near a request timeout (the baseline is milliseconds).
CLAIM_P99_BOUND = 2.0
TABLES = ("tasks", "agents")


@dataclass
class Sample:
    at: float  # time.monotonic() at its end
    held: bool
    dead: dict[str, int]  # what VACUUM could not remove, per table
    claims: int
    p50_ms: float
    p99_ms: float


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def vacuum_and_count(sql: Sql) -> dict[str, int]:
    """VACUUM the hot tables, then the dead row versions it had to leave behind."""
    dead = {}
    for table in TABLES:
        sql.execute(f"VACUUM dispatch.{table}")
        row = sql.execute(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE schemaname = 'dispatch'"
            " AND relname = %s",
            (table,),
        ).fetchone()
        assert row is not None
        dead[table] = int(row["n_dead_tup"])
    return dead


@pytest.mark.slow
@pytest.mark.timeout(HOLD_SECONDS + 240)
async def test_a_transaction_holding_xmin_during_a_soak(
    db_url: str, tmp_path: Path, sql: Sql
) -> None:
    samples: list[Sample] = []
    claims: list[tuple[float, float]] = []  # (started, seconds) of the probe's claims
    with serving(db_url, tmp_path, env={"DISPATCH_LOG_LEVEL": "warning"}) as sp:
        swarm = Swarm(sp.api)

        async def probe() -> None:
            headers = {"X-Agent-ID": "probe"}
            async with httpx.AsyncClient(base_url=sp.api, timeout=60, headers=headers) as http:
                r = await http.put("/api/v1/agents/probe", json={"capabilities": ["probe"]})
                assert r.status_code == 200, r.text
                while True:
                    started = time.monotonic()
                    r = await http.post("/api/v1/tasks/claim", json={"wait_seconds": 0})
                    assert r.status_code == 204, r.text
                    claims.append((started, time.monotonic() - started))
                    await asyncio.sleep(0.05)

        async def sample(held: bool) -> None:
            since = time.monotonic()
            await asyncio.sleep(SAMPLE_SECONDS)
            dead = await asyncio.to_thread(vacuum_and_count, sql)
            took = [seconds for started, seconds in claims if started >= since]
            samples.append(Sample(
                time.monotonic(), held, dead, len(took),
                percentile(took, 0.5) * 1000, percentile(took, 0.99) * 1000,
            ))

        async with swarm.running():
            prober = asyncio.create_task(probe())
            await swarm.until(completed=30)
            await sample(False)
            with psycopg.connect(db_url, row_factory=dict_row, **CONNECT_KWARGS) as holder:  # type: ignore[arg-type]
                holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
                holder.execute("SELECT count(*) FROM dispatch.tasks")
                row = sql.execute(
                    "SELECT backend_xmin IS NOT NULL AS holds FROM pg_stat_activity"
                    " WHERE pid = %s", (holder.info.backend_pid,),
                ).fetchone()
                assert row is not None and row["holds"]
                began = time.monotonic()
                while time.monotonic() - began < HOLD_SECONDS:
                    await sample(True)
                holder.execute("ROLLBACK")
            released = len(samples)
            await sample(False)
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober

    print(f"\nxmin held {HOLD_SECONDS:.0f} s during a soak; {len(swarm.completed)} tasks completed")
    print("   at s  held  dead tasks  dead agents  claims  p50 ms  p99 ms")
    for s in samples:
        print(
            f"{s.at - began:7.0f}  {'yes' if s.held else 'no':>4}  {s.dead['tasks']:10d}"
            f"  {s.dead['agents']:11d}  {s.claims:6d}  {s.p50_ms:6.1f}  {s.p99_ms:6.1f}"
        )
    during = samples[1:released]
    after = samples[released:]
    peak = {t: max(s.dead[t] for s in during) for t in TABLES}
    # The hold was real: vacuum could not clean up behind it.
    assert peak["tasks"] > 1000 and peak["agents"] > 100, peak
    # Once it ended, vacuum removed what had piled up, and the count stays down.
    for s in after:
        for table in TABLES:
            assert s.dead[table] < max(peak[table] // 10, 100), (table, s, peak)
    assert all(s.claims > 0 for s in samples)
    assert max(s.p99_ms for s in during) < CLAIM_P99_BOUND * 1000
    all_invariants(sql, swarm)
