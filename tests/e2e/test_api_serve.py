"""`dispatch serve` as an operator meets it: generated admin token, health, logging."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from dispatch.db import CONNECT_KWARGS
from tests.serve import serving


def test_empty_admin_token_is_generated_and_logged_once(db_url: str, tmp_path: Path) -> None:
    with serving(db_url, tmp_path, admin_token="") as sp:
        found = re.findall(r"generated admin token: (\S+)", sp.log())
        assert len(found) == 1
        token = found[0]
        stats = f"{sp.api}/api/v1/stats"
        ok = httpx.get(stats, headers={"X-Agent-ID": "ops", "Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
        wrong = httpx.get(stats, headers={"X-Agent-ID": "ops", "Authorization": "Bearer x"})
        assert wrong.status_code == 403


def test_health_is_503_when_the_database_is_gone(db_url: str, tmp_path: Path) -> None:
    with serving(db_url, tmp_path) as sp:
        assert httpx.get(f"{sp.ops}/health").status_code == 200
        params = conninfo_to_dict(db_url)
        name = str(params["dbname"])
        with psycopg.connect(make_conninfo(db_url, dbname="postgres"), **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        deadline = time.monotonic() + 15
        while True:
            r = httpx.get(f"{sp.ops}/health", timeout=10)
            if r.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert r.status_code == 503
        assert r.json()["database"] == "down"
        metrics = httpx.get(f"{sp.ops}/metrics", timeout=10)
        assert metrics.status_code == 200 and "dispatch_database_up 0.0" in metrics.text
        r = httpx.get(f"{sp.api}/api/v1/tasks", headers={"X-Agent-ID": "a"}, timeout=15)
        assert r.status_code == 503 and r.json()["error"]


def test_logging_honours_format_and_level(db_url: str, tmp_path: Path) -> None:
    (tmp_path / "json").mkdir()
    (tmp_path / "text").mkdir()
    env = {"DISPATCH_LOG_FORMAT": "json", "DISPATCH_LOG_LEVEL": "info"}
    with serving(db_url, tmp_path / "json", env=env) as sp:
        deadline = time.monotonic() + 10  # /health may answer before the line is written
        while "dispatch serving" not in sp.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        records = [json.loads(line) for line in sp.log().splitlines() if line.startswith("{")]
        assert any(r["message"] == "dispatch serving" and r["level"] == "info" for r in records)
    env = {"DISPATCH_LOG_FORMAT": "text", "DISPATCH_LOG_LEVEL": "warning"}
    with serving(db_url, tmp_path / "text", env=env) as sp:
        httpx.get(f"{sp.api}/api/v1/nothing", headers={"X-Agent-ID": "a"})
    assert "dispatch serving" not in sp.log()
    assert " INFO " not in sp.log()
