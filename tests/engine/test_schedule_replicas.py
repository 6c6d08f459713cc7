"""Three `dispatch serve` replicas on one database run an every-5-seconds schedule while one of
them is killed with SIGKILL every 10 s (and started again; nine kills, each replica three times,
at least 90 s): every fire from the first to the last makes exactly one task, and none is
missed. The kills are counted, not fitted into a fixed time: on a slow machine a replica takes
seconds to start again, and a fixed 90 s held only seven."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.serve import ServeProcess, start_serve

Sql = psycopg.Connection[dict[str, Any]]
KILLS = 9
KILL_EVERY_S = 10
REPLICAS = 3


@pytest.mark.timeout(KILLS * KILL_EVERY_S + 180)
def test_replicas_killed_in_turn_make_exactly_one_task_per_fire(
    db_url: str, sql: Sql, tmp_path: Path
) -> None:
    def start(i: int) -> ServeProcess:
        home = tmp_path / f"replica-{i}-{time.monotonic_ns()}"
        home.mkdir()
        return start_serve(db_url, home)

    replicas = [start(i) for i in range(REPLICAS)]
    kills = 0
    try:
        r = httpx.post(
            f"{replicas[0].api}/api/v1/schedules",
            json={"name": "every5", "cron": "* * * * * */5", "overlap": "allow",
                  "catch_up": "all", "template": {"title": "tick"}},
            headers={"Authorization": f"Bearer {replicas[0].admin_token}", "X-Agent-ID": "ops"},
            timeout=10,
        )
        assert r.status_code == 201, r.text
        while kills < KILLS:
            time.sleep(KILL_EVERY_S)
            victim = kills % REPLICAS
            replicas[victim].kill()
            kills += 1
            replicas[victim] = start(victim)
        sql.execute("UPDATE dispatch.schedules SET paused = true WHERE name = 'every5'")
    finally:
        for replica in replicas:
            replica.stop()
    assert kills == KILLS
    row = sql.execute("SELECT * FROM dispatch.schedules WHERE name = 'every5'").fetchone()
    assert row is not None and row["last_error"] is None
    fires = [r["at"] for r in sql.execute(
        "SELECT (metadata->>'fire_at')::timestamptz AS at FROM dispatch.tasks"
        " WHERE requester = 'schedule:every5' ORDER BY 1"
    ).fetchall()]
    assert len(fires) >= KILLS * KILL_EVERY_S // 5 - 2, len(fires)
    expected = [fires[0] + timedelta(seconds=5 * i) for i in range(len(fires))]
    assert fires == expected, "a fire was made twice or not at all"
    assert fires[-1] == row["last_fire_at"]
    assert row["fired_count"] == len(fires) and row["missed_count"] == 0
