"""`dispatch serve` behind a real PgBouncer (the system's package), in transaction and in session
mode: the lifecycle under concurrent load with no 5xx (no prepared statement of one client
landing on another's server connection), wake-ups by NOTIFY (the assigner's tick is set to a
minute, so a task that reaches its agent at all was woken for), the lock bound answered 503
instead of a hang, UTC, no session advisory lock left on an idle server connection, and a
start-up that refuses, naming the setting, what cannot work."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from dispatch.db import CONNECT_KWARGS
from tests import pgbouncer
from tests.e2e.test_startup import ports, serve
from tests.serve import ServeProcess, serving

TASKS = 240
AGENTS = 4
# A minute: every assignment in these tests is woken by NOTIFY, or it does not happen in time.
SLOW_TICK = {"DISPATCH_TICK_INTERVAL_MS": "60000", "DISPATCH_RETRY_BACKOFF_MS": "0"}


@pytest.fixture(autouse=True)
def _needs_pgbouncer() -> None:
    try:
        pgbouncer.binary()
    except pgbouncer.PgBouncerMissing as exc:
        if os.environ.get("DISPATCH_REQUIRE_PGBOUNCER") == "1":
            pytest.fail(f"{exc}; DISPATCH_REQUIRE_PGBOUNCER=1 (as .ci/run sets) requires it")
        pytest.skip(str(exc))


def role_defaults(db_url: str, settings: dict[str, str] | None) -> None:
    """Set (or with None, reset) the role's defaults in the test's database, as a DBA would for a
    transaction-mode pooler."""
    dbname = conninfo_to_dict(db_url)["dbname"]
    with psycopg.connect(db_url, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
        if settings is None:
            conn.execute(f'ALTER ROLE CURRENT_USER IN DATABASE "{dbname}" RESET ALL')
            return
        for name, value in settings.items():
            conn.execute(f"ALTER ROLE CURRENT_USER IN DATABASE \"{dbname}\" SET {name} = '{value}'")


SERVER_DEFAULTS = {"TimeZone": "UTC", "lock_timeout": "2000ms", "statement_timeout": "15000ms"}


def transaction_env(pooled: str, direct: str) -> dict[str, str]:
    return {
        **SLOW_TICK,
        "DISPATCH_DATABASE_POOL_MODE": "transaction",
        "DISPATCH_DATABASE_LISTEN_URL": direct,
    }


def serve_fails(url: str, tmp_path: Path, env: dict[str, str]) -> str:
    """Run serve expecting it to refuse to start; its output."""
    done = serve(
        "serve", timeout=90, **ports(), DISPATCH_DATABASE_URL=url, DISPATCH_HOST="127.0.0.1",
        DISPATCH_ADMIN_TOKEN="t", DISPATCH_LOG_FORMAT="text",
        DISPATCH_DATA_DIR=str(tmp_path / "data"), DISPATCH_SERVER_WORKERS="1", **env,
    )
    assert done.returncode != 0, done.stdout + done.stderr
    return done.stdout + done.stderr


async def drive(sp: ServeProcess) -> list[int]:
    """TASKS tasks created 20 at a time while AGENTS agents claim (long polls), start and complete
    them; every answer's status."""
    statuses: list[int] = []
    finished = asyncio.Event()
    done_ids: set[str] = set()

    async with httpx.AsyncClient(base_url=sp.api, timeout=60) as http:
        for i in range(AGENTS):
            r = await http.put(f"/api/v1/agents/w{i}", json={"capabilities": ["x"]},
                               headers={"X-Agent-ID": f"w{i}"})
            assert r.status_code in (200, 201), r.text

        async def agent(i: int) -> None:
            me = {"X-Agent-ID": f"w{i}"}
            while not finished.is_set():
                r = await http.post("/api/v1/tasks/claim", json={"wait_seconds": 2}, headers=me)
                statuses.append(r.status_code)
                if r.status_code != 200:
                    continue
                task = r.json()
                r = await http.post(f"/api/v1/tasks/{task['task_id']}/start",
                                    json={"lease": task["lease"]}, headers=me)
                statuses.append(r.status_code)
                r = await http.post(f"/api/v1/tasks/{task['task_id']}/complete",
                                    json={"result": {"by": i}, "lease": task["lease"]}, headers=me)
                statuses.append(r.status_code)
                if r.status_code == 200:
                    done_ids.add(task["task_id"])
                    if len(done_ids) == TASKS:
                        finished.set()

        async def create(n: int) -> None:
            r = await http.post("/api/v1/tasks", json={
                "title": f"t{n}", "required_capabilities": ["x"]}, headers={"X-Agent-ID": "req"})
            statuses.append(r.status_code)

        agents = [asyncio.create_task(agent(i)) for i in range(AGENTS)]
        for start in range(0, TASKS, 20):
            await asyncio.gather(*(create(n) for n in range(start, start + 20)))
        try:
            await asyncio.wait_for(finished.wait(), 50)
        finally:
            finished.set()
            await asyncio.gather(*agents)
    assert len(done_ids) == TASKS
    return statuses


@contextlib.contextmanager
def row_held(db_url: str, task_id: str) -> Iterator[None]:
    """A psql session holding a task's row locked."""
    conn = psycopg.connect(db_url, **CONNECT_KWARGS)  # type: ignore[arg-type]
    with conn, conn.transaction():
        conn.execute("SELECT 1 FROM dispatch.tasks WHERE task_id = %s FOR UPDATE", (task_id,))
        yield


def check_bounds_and_utc(sp: ServeProcess, db_url: str) -> None:
    """A row locked elsewhere: the request is answered 503 (lock_timeout), it does not hang. The
    task's times are UTC."""
    me = {"X-Agent-ID": "w0"}
    with httpx.Client(base_url=sp.api, timeout=30) as http:
        r = http.post("/api/v1/tasks", json={"title": "held", "required_capabilities": ["x"]},
                      headers={"X-Agent-ID": "req"})
        assert r.status_code == 201, r.text
        task_id = r.json()["task_id"]
        with row_held(db_url, task_id):
            r = http.patch(f"/api/v1/tasks/{task_id}",
                           json={"status": "cancelled", "reason": "x"},
                           headers={"X-Agent-ID": "req"})
        assert r.status_code == 503, r.text
        assert r.json()["detail"]["reason"] == "lock_timeout"
        got = http.get(f"/api/v1/tasks/{task_id}", headers=me).json()
        assert got["created_at"].endswith("Z") or got["created_at"].endswith("+00:00")


def no_idle_advisory_locks(db_url: str) -> None:
    with psycopg.connect(db_url, row_factory=dict_row, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
        held = conn.execute(
            "SELECT a.pid, a.state FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            " WHERE l.locktype = 'advisory' AND a.state = 'idle'"
        ).fetchall()
    assert held == []


def test_transaction_mode_runs_the_lifecycle_with_wakeups_bounds_and_utc(
    db_url: str, tmp_path: Path
) -> None:
    role_defaults(db_url, SERVER_DEFAULTS)
    with pgbouncer.pgbouncer(db_url, "transaction", pool_size=8) as pooled, \
            serving(pooled, tmp_path, env=transaction_env(pooled, db_url)) as sp:
        statuses = asyncio.run(drive(sp))
        assert [s for s in statuses if s >= 500] == []
        check_bounds_and_utc(sp, db_url)
        no_idle_advisory_locks(db_url)
        assert "prepared statement" not in sp.log()


def test_session_mode_needs_no_setting_and_keeps_the_bounds(db_url: str, tmp_path: Path) -> None:
    """Session mode, with PgBouncer's stock startup parameters (no ignore_startup_parameters):
    Dispatch sends no libpq `options`; the settings it makes once connected hold."""
    with pgbouncer.pgbouncer(db_url, "session", pool_size=30) as pooled, \
            serving(pooled, tmp_path, env=SLOW_TICK) as sp:
        statuses = asyncio.run(drive(sp))
        assert [s for s in statuses if s >= 500] == []
        check_bounds_and_utc(sp, db_url)


def test_transaction_mode_refuses_to_start_without_the_server_defaults(
    db_url: str, tmp_path: Path
) -> None:
    role_defaults(db_url, {"TimeZone": "America/New_York"})
    with pgbouncer.pgbouncer(db_url, "transaction") as pooled:
        out = serve_fails(pooled, tmp_path, transaction_env(pooled, db_url))
    assert "database.pool_mode is transaction" in out
    for name in ("lock_timeout", "statement_timeout", "TimeZone"):
        assert f"SET {name} = " in out, out


def test_transaction_mode_without_a_listen_url_is_refused(db_url: str, tmp_path: Path) -> None:
    out = serve_fails(db_url, tmp_path, {"DISPATCH_DATABASE_POOL_MODE": "transaction"})
    assert "database.listen_url" in out and "DISPATCH_DATABASE_LISTEN_URL" in out


def test_a_listen_through_a_transaction_pooler_is_refused(db_url: str, tmp_path: Path) -> None:
    """A LISTEN that never hears its own NOTIFY: the listen URL is the pooler's too."""
    role_defaults(db_url, SERVER_DEFAULTS)
    with pgbouncer.pgbouncer(db_url, "transaction") as pooled:
        out = serve_fails(pooled, tmp_path, transaction_env(pooled, pooled))
    assert "did not hear a NOTIFY" in out and "database.listen_url" in out


def test_a_transaction_pooler_taken_for_a_session_is_refused(db_url: str, tmp_path: Path) -> None:
    """pool_mode left at session in front of a transaction pooler: the LISTEN goes through it and
    hears nothing (or the settings do not hold); serve says to set pool_mode and listen_url."""
    with pgbouncer.pgbouncer(db_url, "transaction") as pooled:
        out = serve_fails(pooled, tmp_path, {})
    assert "database.pool_mode" in out, out


def test_a_transaction_pooler_with_a_direct_listen_url_still_needs_pool_mode(
    db_url: str, tmp_path: Path
) -> None:
    """The LISTEN is direct, so it hears; the pool is a transaction pooler taken for a session
    one (its SETs and prepared statements would not hold): serve finds its connections moving
    between server processes and says to set pool_mode."""
    role_defaults(db_url, SERVER_DEFAULTS)
    with pgbouncer.pgbouncer(db_url, "transaction") as pooled:
        out = serve_fails(pooled, tmp_path, {"DISPATCH_DATABASE_LISTEN_URL": db_url})
    assert "behaves as a transaction-mode pooler" in out, out
    assert "database.pool_mode" in out
