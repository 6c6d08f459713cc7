"""An assignment round holds the rows of the agents it assigns to, and nothing else: claims and
completions of other agents go ahead while a round is still open (they would wait behind it if it
held every free agent, as a round that locks its candidates up front does)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from dispatch.db import CONNECT_KWARGS

Conn = psycopg.Connection[dict[str, Any]]


def connect(url: str) -> Conn:
    conn = psycopg.connect(url, row_factory=dict_row, **CONNECT_KWARGS)  # type: ignore[arg-type]
    conn.execute("SET lock_timeout = '2s'")  # a wait that long is a wait behind the round
    return conn


def test_a_round_blocks_only_the_agents_it_assigns_to(db_url: str, sql: Conn) -> None:
    for agent in ("a1", "a2", "a3", "a4"):
        sql.execute("SELECT dispatch.agent_upsert(%s, p_max_concurrent => 5)", (agent,))
    # a4 is working on a task already.
    sql.execute("SELECT dispatch.create_task('running')")
    held = sql.execute("SELECT task_id FROM dispatch.task_claim('a4', NULL, now(), 1, true)")
    running = held.fetchone()
    assert running is not None
    sql.execute(
        "INSERT INTO dispatch.tasks (title) SELECT 'backlog ' || g FROM generate_series(1, 200) g"
    )
    with connect(db_url) as round_conn, connect(db_url) as other, round_conn.transaction():
        made = round_conn.execute("SELECT * FROM dispatch.task_assign(2)").fetchall()
        busy = {m["agent_id"] for m in made}
        assert len(made) == 2 and len(busy) == 2 and "a4" not in busy
        idle = sorted({"a1", "a2", "a3"} - busy)
        # While the round is open: another agent claims, a4 completes and claims again.
        claimed = other.execute(
            "SELECT task_id FROM dispatch.task_claim(%s)", (idle[0],)
        ).fetchall()
        assert len(claimed) == 1
        done = other.execute(
            "SELECT status FROM dispatch.task_complete(%s, 'a4', '{}')",
            (running["task_id"],),
        ).fetchone()
        assert done == {"status": "completed"}
        assert len(other.execute("SELECT * FROM dispatch.task_claim('a4')").fetchall()) == 1
        # The agents of the round are held until it commits.
        with pytest.raises(psycopg.errors.LockNotAvailable):
            other.execute("SELECT * FROM dispatch.task_claim(%s)", (sorted(busy)[0],))
    active = sql.execute(
        "SELECT agent_id, active_tasks, counted_active_tasks FROM dispatch.agent_load"
    ).fetchall()
    assert all(r["active_tasks"] == r["counted_active_tasks"] for r in active), active
