"""`dispatch serve` as an operator meets it: the banner with the generated admin token, health,
logging."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from dispatch.db import CONNECT_KWARGS
from tests.serve import ServeProcess, serve_ports, serving


def test_empty_admin_token_is_generated_and_shown_once_in_the_banner(
    db_url: str, tmp_path: Path
) -> None:
    with serving(db_url, tmp_path, admin_token="") as sp:
        log = wait_for_banner(sp)
        found = re.findall(r"export DISPATCH_ADMIN_TOKEN=(\S+)", log)
        assert len(found) == 1
        token = found[0]
        assert log.count(token) == 1  # not in a log line too
        stats = f"{sp.api}/api/v1/stats"
        ok = httpx.get(stats, headers={"X-Agent-ID": "ops", "Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
        wrong = httpx.get(stats, headers={"X-Agent-ID": "ops", "Authorization": "Bearer x"})
        assert wrong.status_code == 403


def wait_for_banner(sp: ServeProcess) -> str:
    deadline = time.monotonic() + 30  # the banner follows /health by a moment
    while "Dispatch is serving" not in sp.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    return sp.log()


def test_workers_print_one_banner_and_json_logs_off_a_terminal(
    db_url: str, tmp_path: Path
) -> None:
    """The default log format, with stderr a file: JSON lines, none with a terminal escape code
    (uvicorn's color_message). Two workers, one banner, by the supervisor once both serve."""
    env = {"DISPATCH_SERVER_WORKERS": "2", "DISPATCH_LOG_FORMAT": "auto"}
    with serving(db_url, tmp_path, admin_token="", env=env) as sp:
        log = wait_for_banner(sp)
        assert log.count("Dispatch is serving") == 1, log
        assert "Dispatch is serving (2 workers)." in log
        for url in (f"{sp.api}/api/v1", f"{sp.api}/ui", f"{sp.api}/schema/swagger",
                    f"{sp.ops}/metrics"):
            assert url in log, url
        token = re.findall(r"export DISPATCH_ADMIN_TOKEN=(\S+)", log)
        assert len(token) == 1 and log.count(token[0]) == 1
        banner = log[log.index("Dispatch is serving"):].split("\n{")[0]
        lines = [line for line in log.replace(banner, "").splitlines() if line.strip()]
        assert lines and all(line.startswith("{") for line in lines), lines
        records = [json.loads(line) for line in lines]
        assert "\x1b" not in log
        assert not any("color_message" in r for r in records)
        assert any(r["message"] == "dispatch serving" for r in records)


def test_logs_are_text_on_a_terminal(db_url: str, tmp_path: Path) -> None:
    """The default format with stderr a terminal (a pty here): text lines, and the banner."""
    api, ops = serve_ports()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")} | {
        "DISPATCH_DATABASE_URL": db_url, "DISPATCH_PORT": str(api),
        "DISPATCH_METRICS_PORT": str(ops), "DISPATCH_HOST": "127.0.0.1",
        "DISPATCH_SERVER_WORKERS": "1", "DISPATCH_DATA_DIR": str(tmp_path / "data"),
    }
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "dispatch", "serve"], env=env,
                            stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    out = b""
    try:
        deadline = time.monotonic() + 60
        while b"export PATH" not in out and b"Dispatch is serving" not in out:
            assert time.monotonic() < deadline and proc.poll() is None, out.decode(errors="replace")
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                out += os.read(leader, 65536)
        time.sleep(0.3)
        while select.select([leader], [], [], 0.2)[0]:
            out += os.read(leader, 65536)
    finally:
        proc.terminate()
        proc.wait(30)
        os.close(leader)
    text = out.decode(errors="replace")
    assert re.search(r"^\S+ \S+ INFO dispatch\.service: dispatch serving\r?$", text, re.M), text
    assert not any(line.startswith("{") for line in text.splitlines())
    assert "export DISPATCH_ADMIN_TOKEN=" in text


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
