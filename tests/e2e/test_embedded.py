"""The embedded default: no database URL, a private Postgres in DISPATCH_DATA_DIR that keeps its
data across restarts."""

from __future__ import annotations

from pathlib import Path

import httpx
import psycopg

from dispatch.migrate import discover
from tests.serve import serving


def test_serve_without_database_url_keeps_data_across_restarts(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    socket_url = f"postgresql://postgres:@/postgres?host={data_dir / 'pg'}"
    with serving("", tmp_path) as sp:
        health = httpx.get(f"{sp.ops}/health").json()
        assert health["database"] == "ok"
        with psycopg.connect(socket_url, autocommit=True) as conn:
            conn.execute("INSERT INTO dispatch.tasks (title) VALUES ('survives a restart')")
    assert (data_dir / "pg" / "PG_VERSION").exists()
    with serving("", tmp_path) as sp, psycopg.connect(socket_url) as conn:
        assert httpx.get(f"{sp.ops}/health").status_code == 200
        titles = [r[0] for r in conn.execute("SELECT title FROM dispatch.tasks")]
        versions = conn.execute("SELECT count(*) FROM dispatch.schema_migrations").fetchone()
    assert titles == ["survives a restart"]
    assert versions is not None and versions[0] == len(discover())
