"""A stuck row must not take the API down: a psql session holds a task row and an agent row
locked while agents complete and heartbeat against them (on the default settings: lock_timeout
2 s, statement_timeout 15 s, a pool of 10 waiting at most 10 s)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.rows import dict_row

from dispatch.db import CONNECT_KWARGS
from dispatch.settings import DatabaseSettings
from tests.chaos.checks import history_sound, loads_match_slots
from tests.serve import serving

Sql = psycopg.Connection[dict[str, Any]]
DEFAULTS = DatabaseSettings()
# Far beyond the bound (lock_timeout, plus a pool wait behind other stuck requests), far below
# "until the lock goes away", which is when the answer came before the bound existed.
ANSWER_WITHIN = 2 * DEFAULTS.lock_timeout_ms / 1000 + DEFAULTS.pool_timeout_ms / 1000 + 10
# Several times the pool's 10 connections: requests queue for a connection behind the ones that
# wait on the row, longer than /health would wait for one.
HEARTBEATS = 40


@contextlib.contextmanager
def locked(db_url: str, query: str, params: tuple[object, ...]) -> Iterator[None]:
    """A session, as a DBA's psql would hold it, with the selected rows locked until the block
    ends."""
    with psycopg.connect(db_url, row_factory=dict_row, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
        conn.execute("BEGIN")
        assert conn.execute(query, params).fetchall()
        try:
            yield
        finally:
            conn.execute("ROLLBACK")


def lock_waits(sql: Sql) -> int:
    row = sql.execute(
        "SELECT count(*) AS n FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    ).fetchone()
    assert row is not None
    return int(row["n"])


def busy(r: httpx.Response, *reasons: str) -> None:
    """A clear 503: JSON error naming the reason, Retry-After in whole seconds."""
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"].isdigit(), r.headers
    body = r.json()
    assert body["detail"]["reason"] in (reasons or ("lock_timeout",)), body
    assert body["detail"]["reason"].split("_")[0] in body["error"], body


async def test_a_locked_task_row_answers_503_and_the_rest_of_the_api_keeps_working(
    db_url: str, tmp_path: Path, sql: Sql
) -> None:
    with serving(db_url, tmp_path) as sp:
        async with httpx.AsyncClient(
            base_url=sp.api, timeout=ANSWER_WITHIN, headers={"X-Agent-ID": "worker-1"}
        ) as http:
            r = await http.put("/api/v1/agents/worker-1", json={"capabilities": ["code"]})
            assert r.status_code == 200, r.text
            r = await http.post(
                "/api/v1/tasks", json={"title": "stuck", "scope": "code"},
                headers={"X-Agent-ID": "alice"},
            )
            assert r.status_code == 201, r.text
            task_id = r.json()["task_id"]
            async with asyncio.timeout(30):  # the assigner pushes it to the only agent
                while (await http.get(f"/api/v1/tasks/{task_id}")).json()["status"] != "assigned":
                    await asyncio.sleep(0.05)
            r = await http.post(f"/api/v1/tasks/{task_id}/start")
            assert r.status_code == 200, r.text

            with locked(
                db_url, "SELECT 1 FROM dispatch.tasks WHERE task_id = %s FOR UPDATE", (task_id,)
            ):
                r = await http.post(
                    f"/api/v1/tasks/{task_id}/complete", json={"result": {"ok": True}}
                )
                busy(r)
                # The same task can still be read, and other work goes on.
                r = await http.get(f"/api/v1/tasks/{task_id}")
                assert r.status_code == 200 and r.json()["status"] == "running", r.text
                r = await http.post(
                    "/api/v1/tasks", json={"title": "another"}, headers={"X-Agent-ID": "bob"}
                )
                assert r.status_code == 201, r.text
            r = await http.post(f"/api/v1/tasks/{task_id}/complete", json={"result": {"ok": 1}})
            assert r.status_code == 200 and r.json()["result"] == {"ok": 1}, r.text
    loads_match_slots(sql)
    history_sound(sql)


async def test_heartbeats_on_a_locked_agent_row_do_not_exhaust_the_pool_for_everyone(
    db_url: str, tmp_path: Path, sql: Sql
) -> None:
    with serving(db_url, tmp_path) as sp:
        async with httpx.AsyncClient(
            base_url=sp.api, timeout=ANSWER_WITHIN, headers={"X-Agent-ID": "worker-1"}
        ) as http:
            r = await http.put("/api/v1/agents/worker-1", json={"capabilities": ["code"]})
            assert r.status_code == 200, r.text
            r = await http.post(
                "/api/v1/tasks", json={"title": "unrelated"}, headers={"X-Agent-ID": "alice"}
            )
            assert r.status_code == 201, r.text
            unrelated = r.json()["task_id"]

            stop = asyncio.Event()
            answers: list[httpx.Response] = []
            hung: list[str] = []

            async def heartbeat() -> None:
                while not stop.is_set():
                    try:
                        answers.append(await http.post("/api/v1/agents/worker-1/heartbeat"))
                    except httpx.TimeoutException as exc:
                        hung.append(repr(exc))

            with locked(
                db_url, "SELECT 1 FROM dispatch.agents WHERE agent_id = %s FOR UPDATE",
                ("worker-1",),
            ):
                beats = [asyncio.create_task(heartbeat()) for _ in range(HEARTBEATS)]
                try:
                    async with asyncio.timeout(30):  # every pooled connection waits on the row
                        while lock_waits(sql) < DEFAULTS.pool_max:
                            await asyncio.sleep(0.02)
                    # While every connection of the pool may be waiting on the row, unrelated
                    # requests get their turn and /health reports the database as it is.
                    r = await http.get(f"{sp.ops}/health")
                    assert r.status_code == 200 and r.json()["database"] == "ok", r.text
                    assert r.json()["database_pool"]["waiting"] > 0, r.text
                    r = await http.get(f"/api/v1/tasks/{unrelated}")
                    assert r.status_code == 200, r.text
                    r = await http.post(
                        "/api/v1/tasks", json={"title": "meanwhile"},
                        headers={"X-Agent-ID": "bob"},
                    )
                    assert r.status_code == 201, r.text
                    r = await http.get(f"{sp.ops}/health")
                    assert r.status_code == 200 and r.json()["database"] == "ok", r.text
                    async with asyncio.timeout(ANSWER_WITHIN):
                        while len(answers) < HEARTBEATS:
                            await asyncio.sleep(0.05)
                finally:
                    stop.set()
                    await asyncio.gather(*beats)
            assert answers and not hung, hung
            for answer in answers:
                busy(answer, "lock_timeout", "pool_timeout")
            r = await http.post("/api/v1/agents/worker-1/heartbeat")
            assert r.status_code == 200, r.text
    loads_match_slots(sql)
