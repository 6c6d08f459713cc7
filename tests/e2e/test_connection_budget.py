"""One connection budget per `dispatch serve`: its workers and their pools share it, so two serves
asking for many workers against a server with few connections both start, both serve, and
psql still gets in."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg

from tests import pg, pgdist
from tests.serve import serving

LIMIT = 30


@contextlib.contextmanager
def small_server() -> Iterator[str]:
    """A server of this build with max_connections = LIMIT."""
    if os.environ.get("DISPATCH_TEST_PG") == "distribution":
        with pgdist.cluster(settings={"max_connections": str(LIMIT)}) as url:
            yield url
    else:
        with pg.embedded_server(max_connections=LIMIT) as url:
            yield url


def client_connections(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        ).fetchone()
    assert row is not None
    return int(row[0]) - 1


def test_two_serves_with_many_workers_fit_a_small_server(tmp_path: Path) -> None:
    with small_server() as admin_url:
        name = f"budget_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = pg.database_url(admin_url, name)
        many = {"DISPATCH_SERVER_WORKERS": "8"}
        for side in ("a", "b"):
            (tmp_path / side).mkdir()
        with serving(url, tmp_path / "a", env=many, timeout=90) as a, \
                serving(url, tmp_path / "b", env=many, timeout=90) as b:
            headers = {"X-Agent-ID": "alice"}
            made = httpx.post(f"{a.api}/api/v1/tasks", json={"title": "fits"}, headers=headers)
            assert made.status_code == 201, made.text
            task_id = made.json()["task_id"]
            seen = httpx.get(f"{b.api}/api/v1/tasks/{task_id}", headers=headers)
            assert seen.status_code == 200
            for sp in (a, b):
                assert httpx.get(f"{sp.ops}/health").json()["database"] == "ok"
                assert "workers with pools of" in sp.log()  # it said what it cut down
            # psql (and other clients) still get in: room was kept beside both budgets.
            held = client_connections(url)
            assert held <= LIMIT - 3 - 5, held
            extra = [psycopg.connect(url) for _ in range(5)]
            for conn in extra:
                conn.close()
