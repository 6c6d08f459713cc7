"""database.read_url: the dashboard, stats, the metrics' gauges and explain read from a streaming
standby while it is up and within read_max_lag_ms; the lifecycle never does; reads fall back to the
primary when the replica is down, behind or not a standby; /health and the dashboard say which."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from dispatch.db import CONNECT_KWARGS
from dispatch.migrate import migrate
from tests import pgdist
from tests.pgstandby import Standby
from tests.serve import ServeProcess, free_port, serving
from tests.ui.test_live import Stream, until


def health_replica(sp: ServeProcess) -> dict[str, object]:
    replica = httpx.get(f"{sp.ops}/health", timeout=5).json()["replica"]
    assert isinstance(replica, dict)
    return replica


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def pending(sp: ServeProcess) -> int:
    r = httpx.get(f"{sp.api}/api/v1/stats", timeout=10,
                  headers={"X-Agent-ID": "ops", "Authorization": f"Bearer {sp.admin_token}"})
    assert r.status_code == 200, r.text
    return int(r.json()["queue"].get("pending", 0))


def create(sp: ServeProcess, title: str) -> str:
    r = httpx.post(f"{sp.api}/api/v1/tasks", json={"title": title, "required_capabilities": ["z"]},
                   headers={"X-Agent-ID": "req"}, timeout=10)
    assert r.status_code == 201, r.text
    return str(r.json()["task_id"])


def overview(sp: ServeProcess) -> str:
    with httpx.Client(base_url=sp.api, timeout=10) as ui:
        assert ui.post("/ui/login", data={"token": sp.admin_token}).status_code in (200, 303)
        r = ui.get("/ui")
        assert r.status_code == 200, r.text
        return r.text


def test_a_read_url_that_is_not_a_standby_is_not_read_from(db_url: str, tmp_path: Path) -> None:
    """read_url naming the primary itself (not in recovery): reads stay on the primary, and
    /health and the dashboard say why."""
    with serving(db_url, tmp_path, env={"DISPATCH_DATABASE_READ_URL": db_url}) as sp:
        wait_until(lambda: health_replica(sp)["status"] == "not a standby", "the monitor")
        assert health_replica(sp)["reads"] == "primary"
        create(sp, "one")
        assert pending(sp) == 1
        assert "not a standby" in overview(sp)


def test_a_replica_that_is_down_does_not_stop_serve(db_url: str, tmp_path: Path) -> None:
    dead = make_conninfo(host="127.0.0.1", port=free_port(), user="postgres", dbname="x")
    with serving(db_url, tmp_path, env={"DISPATCH_DATABASE_READ_URL": dead}) as sp:
        wait_until(lambda: health_replica(sp)["status"] == "down", "the monitor")
        assert httpx.get(f"{sp.ops}/health").status_code == 200
        create(sp, "one")
        assert pending(sp) == 1
        assert 'data-reads="primary"' in overview(sp)


# -- a real streaming standby (the distribution's PostgreSQL) ------------------------------------


@pytest.fixture
def replicated() -> Iterator[tuple[str, Standby]]:
    """A PG 15 primary with a migrated database `dispatch`, and a streaming hot standby of it."""
    if os.environ.get("DISPATCH_TEST_PG") != "distribution":
        pytest.skip("a streaming standby runs on the distribution build (DISPATCH_TEST_PG)")
    with pgdist.running() as primary:
        with psycopg.connect(primary.url, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
            conn.execute("CREATE DATABASE dispatch")
        url = primary.url.rsplit("/", 1)[0] + "/dispatch"
        migrate(url)
        standby = Standby(primary)
        standby.start()
        try:
            yield url, standby
        finally:
            standby.stop()


async def test_reads_follow_the_replica_and_fall_back_when_it_is_down_or_behind(
    replicated: tuple[str, Standby], tmp_path: Path
) -> None:
    url, standby = replicated
    read = {"DISPATCH_DATABASE_READ_URL": standby.url("dispatch")}

    # 1. Within the bound (a minute): stats come from the replica, so with its replay paused a
    # new task is not in them, while the task itself (the lifecycle, on the primary) is there.
    with serving(url, tmp_path, env={**read, "DISPATCH_DATABASE_READ_MAX_LAG_MS": "60000"}) as sp:
        wait_until(lambda: health_replica(sp)["reads"] == "replica", "reads on the replica")
        assert 'data-reads="replica"' in overview(sp)
        standby.replay("dispatch", paused=True)
        stream = Stream()
        async with httpx.AsyncClient(base_url=sp.api, timeout=30) as ui:
            assert (await ui.post("/ui/login", data={"token": sp.admin_token})).status_code in (
                200, 303)
            follow = asyncio.create_task(stream.follow(ui))
            await until(lambda: stream.pending == 0, "the dashboard's first snapshot")
            task_id = await asyncio.to_thread(create, sp, "unseen on the replica")
            # The stats read the replica, which has not the task; the dashboard's refresh, woken
            # by the primary's notification, waits for the replica to replay it, and reads the
            # primary when it does not in time.
            assert await asyncio.to_thread(pending, sp) == 0
            await until(lambda: stream.pending == 1, "the dashboard showing the new task")
            follow.cancel()
        r = httpx.get(f"{sp.api}/api/v1/tasks/{task_id}", headers={"X-Agent-ID": "req"})
        assert r.status_code == 200 and r.json()["status"] == "pending"
        explain = httpx.get(f"{sp.api}/api/v1/tasks/{task_id}/explain", headers={
            "X-Agent-ID": "ops", "Authorization": f"Bearer {sp.admin_token}"})
        assert explain.status_code == 200, explain.text  # not on the replica: from the primary
        # The replica stops: reads go back to the primary, /health stays 200.
        standby.stop()
        wait_until(lambda: health_replica(sp)["status"] == "down", "the replica down")
        assert httpx.get(f"{sp.ops}/health").status_code == 200
        assert pending(sp) == 1
        assert 'data-reads="primary"' in overview(sp)

    # 2. A bound of one second: a replica whose replay is paused falls behind it, and reads
    # leave it; when replay resumes they come back.
    standby.start()
    with serving(url, tmp_path, env={**read, "DISPATCH_DATABASE_READ_MAX_LAG_MS": "1000"}) as sp:
        wait_until(lambda: health_replica(sp)["reads"] == "replica", "reads on the replica")
        assert pending(sp) == 1
        standby.replay("dispatch", paused=True)
        create(sp, "second")
        wait_until(lambda: health_replica(sp)["status"] == "behind", "the replica behind")
        lag = health_replica(sp)["lag_ms"]
        assert isinstance(lag, int) and lag > 1000
        assert pending(sp) == 2
        standby.replay("dispatch", paused=False)
        wait_until(lambda: health_replica(sp)["reads"] == "replica", "reads back on the replica")
        assert pending(sp) == 2

