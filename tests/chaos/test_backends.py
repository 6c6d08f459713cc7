"""Backends killed under load: rounds of pg_terminate_backend on every session of `dispatch serve`
(its pooled connections, LISTEN and /health's own) while requesters and agents run lifecycles.

What must hold: no 500; nothing acknowledged is lost; active counts and the history stay sound;
and no request fails on a stale pooled connection. Precisely: a request may be answered 503 only
if it was in flight while a kill round ran (from just before the backends were listed until every
one of them had exited): a connection killed while it sat in the pool is never handed out. A
request killed mid-statement is a 503 with Retry-After, and the client's retry settles it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from dispatch.db import CONNECT_KWARGS
from tests.chaos.checks import all_invariants
from tests.chaos.swarm import Swarm
from tests.serve import serving

Sql = psycopg.Connection[dict[str, Any]]
ROUNDS = 12


def kill_backends(killer: Sql, spare: int) -> int:
    """Terminate every client session of the database but the killer's and `spare`, and wait
    until each has exited (polling, so that the round ends as soon as the last one is gone)."""
    rows = killer.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid NOT IN (pg_backend_pid(), %s) AND backend_type = 'client backend'",
        (spare,),
    ).fetchall()
    pids = [r["pid"] for r in rows]
    killer.execute("SELECT pg_terminate_backend(p) FROM unnest(%s::integer[]) p", (pids,))
    deadline = time.monotonic() + 10
    while killer.execute(
        "SELECT 1 FROM pg_stat_activity WHERE pid = ANY (%s)", (pids,)
    ).fetchall():
        assert time.monotonic() < deadline, "backends did not exit"
        time.sleep(0.002)
    return len(pids)


async def test_backends_killed_under_load_lose_nothing_and_no_stale_connection_fails(
    db_url: str, tmp_path: Path, sql: Sql
) -> None:
    killer = psycopg.connect(db_url, row_factory=dict_row, **CONNECT_KWARGS)  # type: ignore[arg-type]
    with killer, serving(db_url, tmp_path, env={"DISPATCH_LOG_LEVEL": "warning"}) as sp:
        swarm = Swarm(sp.api)
        rounds: list[tuple[float, float, int]] = []
        async with swarm.running():
            await swarm.until(completed=20)
            for _ in range(ROUNDS):
                started = time.monotonic()
                killed = await asyncio.to_thread(kill_backends, killer, sql.info.backend_pid)
                rounds.append((started, time.monotonic(), killed))
                await swarm.until(completed=25)  # the pool gets its chance between rounds

    killed = sum(n for _, _, n in rounds)
    failed = swarm.answered(503)
    print(
        f"\nkilled {killed} backends in {len(rounds)} rounds during {len(swarm.calls)} requests;"
        f" {len(failed)} answered 503 (each in flight during a round), {len(swarm.completed)}"
        " tasks completed"
    )
    assert killed >= ROUNDS * 3  # the pool's connections at least, each round
    assert not swarm.answered(None), swarm.answered(None)[:3]
    outside = [
        c for c in failed
        if not any(c.started <= end and start <= c.ended for start, end, _ in rounds)
    ]
    assert not outside, f"503 on a stale pooled connection: {outside[:3]}"
    all_invariants(sql, swarm)
