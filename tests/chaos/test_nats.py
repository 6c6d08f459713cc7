"""NATS and the database failing around `dispatch serve` with hermes.url set: NATS down at start and
mid-run under load, SIGTERM under load, and an agent's NATS report meeting a locked row."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import psycopg

from dispatch.events.relay import MSG_ID_HEADER
from dispatch.events.schemas import ORIGIN_HEADER, ORIGIN_RELAY
from tests.chaos.checks import (
    all_invariants,
    history_sound,
    loads_match_slots,
    nothing_acknowledged_lost,
)
from tests.chaos.swarm import Swarm
from tests.chaos.test_locks import locked
from tests.events.conftest import eventually
from tests.events.streamread import Stored, read_stream
from tests.natsfix import NatsServer
from tests.serve import serving, start_serve

Sql = psycopg.Connection[dict[str, Any]]


async def nats_health(ops: str) -> str:
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(f"{ops}/health")
    assert r.status_code == 200, r.text  # NATS never takes the broker down
    return str(r.json()["nats"])


async def until_nats(ops: str, state: str) -> None:
    async def check() -> bool:
        return await nats_health(ops) == state

    await eventually(check, timeout=60, what=f"/health nats {state}")


def unpublished(sql: Sql) -> int:
    row = sql.execute(
        "SELECT count(*) AS n FROM dispatch.task_events WHERE published_at IS NULL"
    ).fetchone()
    assert row is not None
    return int(row["n"])


async def relayed(url: str) -> list[Stored]:
    """What the relay stored in DISPATCH_EVENTS (agents' own reports left out)."""
    nc = await nats.connect(url)
    try:
        return [m for m in await read_stream(nc) if m.headers.get(ORIGIN_HEADER) == ORIGIN_RELAY]
    finally:
        await nc.close()


def in_stream_once_in_order(sql: Sql, stored: list[Stored], *, all_events: bool) -> None:
    """Each event at most once in the stream (exactly once with all_events: every event of the
    log), each task's events in id order, an assignment also once on the agent's subject; and
    every event the log marks published is in the stream."""
    events = sql.execute(
        "SELECT id, task_id::text, event, published_at IS NOT NULL AS marked"
        " FROM dispatch.task_events ORDER BY id"
    ).fetchall()
    on_task = [m for m in stored if m.subject.startswith("swarm.task.")]
    ids = [int(m.headers[MSG_ID_HEADER].split(".", 1)[0]) for m in on_task]
    assert len(ids) == len(set(ids)), "an event is in the stream twice"
    marked = {e["id"] for e in events if e["marked"]}
    lost = sorted(marked - set(ids))
    assert not lost, f"marked published but not in the stream: {lost[:5]}"
    if all_events:
        assert sorted(ids) == [e["id"] for e in events]
    per_task: dict[str, list[int]] = defaultdict(list)
    for m, event_id in zip(on_task, ids, strict=True):
        per_task[m.subject.split(".")[2]].append(event_id)
    assert all(seq == sorted(seq) for seq in per_task.values()), "a task's events out of order"
    agent_ids = [
        m.headers[MSG_ID_HEADER] for m in stored if m.subject.startswith("swarm.dispatch.")
    ]
    assert len(agent_ids) == len(set(agent_ids))
    if all_events:
        assigned = {e["id"] for e in events if e["event"] == "assigned"}
        assert {int(i.split(".", 1)[0]) for i in agent_ids} == assigned
        assert all(i.endswith(":agent") for i in agent_ids)


async def test_nats_down_at_start_and_mid_run_under_load(
    db_url: str, tmp_path: Path, sql: Sql
) -> None:
    server = NatsServer(tmp_path / "nats")  # not started: NATS is down when serve starts
    env = {"DISPATCH_HERMES_URL": server.url, "DISPATCH_LOG_LEVEL": "warning"}
    try:
        with serving(db_url, tmp_path, env=env) as sp:
            assert await nats_health(sp.ops) == "down"
            swarm = Swarm(sp.api)
            async with swarm.running():
                await swarm.until(completed=15)  # the API works without NATS
                assert unpublished(sql) > 0
                server.start()
                await until_nats(sp.ops, "ok")
                await swarm.until(completed=15)
                server.stop()
                await until_nats(sp.ops, "down")
                await swarm.until(completed=15)
                server.start()
                await until_nats(sp.ops, "ok")
                await swarm.until(completed=10)

            async def backlog_gone() -> bool:
                return await asyncio.to_thread(unpublished, sql) == 0

            await eventually(backlog_gone, timeout=60, what="every event published")
            in_stream_once_in_order(sql, await relayed(server.url), all_events=True)
            async with httpx.AsyncClient(timeout=10) as http:
                report = (await http.get(f"{sp.ops}/health")).json()
            assert report["event_relay"] == "ok", report
    finally:
        server.stop()
    all_invariants(sql, swarm)


async def test_sigterm_under_load_with_nats_exits_cleanly_and_loses_nothing(
    db_url: str, tmp_path: Path, sql: Sql, nats_server: NatsServer
) -> None:
    env = {"DISPATCH_HERMES_URL": nats_server.url, "DISPATCH_LOG_LEVEL": "warning"}
    sp = start_serve(db_url, tmp_path, env=env)
    try:
        await until_nats(sp.ops, "ok")
        swarm = Swarm(sp.api)
        async with swarm.running(finish=False):
            await swarm.until(completed=30)
            sp.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(sp.proc.wait, 30)
    finally:
        sp.stop()
    assert code == 0, sp.log()
    assert "Traceback" not in sp.log(), sp.log()
    # Everything acknowledged before the signal (and during the graceful stop) is kept, and every
    # event is either in the stream or still in the outbox.
    nothing_acknowledged_lost(sql, swarm)
    loads_match_slots(sql)
    history_sound(sql)
    assert not [c for c in swarm.calls if (c.status or 0) >= 500 and c.status != 503]
    in_stream_once_in_order(sql, await relayed(nats_server.url), all_events=False)
    # The next serve relays what was left, without a duplicate.
    (tmp_path / "again").mkdir()
    with serving(db_url, tmp_path / "again", env=env):

        async def backlog_gone() -> bool:
            return await asyncio.to_thread(unpublished, sql) == 0

        await eventually(backlog_gone, timeout=60, what="the outbox relayed")
    in_stream_once_in_order(sql, await relayed(nats_server.url), all_events=True)


async def test_a_nats_report_that_meets_a_locked_row_is_retried_not_dropped(
    db_url: str, tmp_path: Path, sql: Sql, nats_server: NatsServer
) -> None:
    env = {"DISPATCH_HERMES_URL": nats_server.url}
    with serving(db_url, tmp_path, env=env) as sp:
        async with httpx.AsyncClient(base_url=sp.api, timeout=30) as http:
            r = await http.put(
                "/api/v1/agents/worker-1", json={"capabilities": ["code"]},
                headers={"X-Agent-ID": "worker-1"},
            )
            assert r.status_code == 200, r.text
            r = await http.post(
                "/api/v1/tasks", json={"title": "reported over NATS", "scope": "code"},
                headers={"X-Agent-ID": "alice"},
            )
            task_id = r.json()["task_id"]
            async with asyncio.timeout(30):
                while (await http.get(
                    f"/api/v1/tasks/{task_id}", headers={"X-Agent-ID": "alice"}
                )).json()["status"] != "assigned":
                    await asyncio.sleep(0.05)
        await until_nats(sp.ops, "ok")
        nc = await nats.connect(nats_server.url)
        try:
            with locked(
                db_url, "SELECT 1 FROM dispatch.tasks WHERE task_id = %s FOR UPDATE", (task_id,)
            ):
                # Fire and forget, as agents report: nobody would ever hear of a 503.
                await nc.publish(
                    f"swarm.task.{task_id}.completed",
                    msgspec.json.encode({"agent_id": "worker-1", "result": {"via": "nats"}}),
                )
                await nc.flush()

                def waiting_on_the_row() -> bool:
                    row = sql.execute(
                        "SELECT count(*) AS n FROM pg_stat_activity"
                        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    ).fetchone()
                    return row is not None and row["n"] > 0

                async def waiting() -> bool:
                    return await asyncio.to_thread(waiting_on_the_row)

                await eventually(waiting, what="the report waiting on the row")
                # Held past lock_timeout: the first attempt is refused as busy.
                await asyncio.sleep(3)
        finally:
            await nc.close()

        def completed() -> bool:
            row = sql.execute(
                "SELECT status::text, result FROM dispatch.tasks WHERE task_id = %s",
                (uuid.UUID(task_id),),
            ).fetchone()
            return row is not None and row["status"] == "completed" and row["result"] == {
                "via": "nats"
            }

        async def is_completed() -> bool:
            return await asyncio.to_thread(completed)

        await eventually(is_completed, timeout=30, what="the report applied after the lock")
    loads_match_slots(sql)
