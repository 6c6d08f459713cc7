"""Nothing on a task's path waits for another task's transaction on a row they share: an
assignment round and the claims of any agent (those it assigns to included) go ahead side by side,
each taking its own slots of the agent, and the agent's limit still holds among them. What changes
what an agent may take (a drain) waits for the gives under way, and they for it."""

from __future__ import annotations

import threading
import time
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
        # An agent of the round claims too: it takes another of its slots.
        mine = other.execute(
            "SELECT slot FROM dispatch.task_claim(%s)", (sorted(busy)[0],)
        ).fetchall()
        assert len(mine) == 1
        # A drain of that agent waits until the round commits.
        with pytest.raises(psycopg.errors.LockNotAvailable):
            other.execute("SELECT dispatch.agent_drain(%s)", (sorted(busy)[0],))
    active = sql.execute(
        "SELECT agent_id, active_tasks, slots_held FROM dispatch.agent_load"
    ).fetchall()
    assert all(r["active_tasks"] == r["slots_held"] for r in active), active


def test_the_claims_of_one_agent_take_its_slots_side_by_side(db_url: str, sql: Conn) -> None:
    """Two open transactions claim for one agent with a limit of 2: neither waits for the other,
    they hold different slots, and a third claim finds no slot (nothing, at once) until one
    commits a completion."""
    sql.execute("SELECT dispatch.agent_upsert('a1', p_max_concurrent => 2)")
    sql.execute(
        "INSERT INTO dispatch.tasks (title) SELECT 'backlog ' || g FROM generate_series(1, 5) g"
    )
    with connect(db_url) as c1, connect(db_url) as c2, connect(db_url) as c3:
        with c1.transaction(), c2.transaction():
            one = c1.execute("SELECT task_id, slot FROM dispatch.task_claim('a1')").fetchall()
            two = c2.execute("SELECT task_id, slot FROM dispatch.task_claim('a1')").fetchall()
            assert len(one) == len(two) == 1
            assert {one[0]["slot"], two[0]["slot"]} == {1, 2}
            assert c3.execute("SELECT * FROM dispatch.task_claim('a1')").fetchall() == []
        assert c3.execute("SELECT * FROM dispatch.task_claim('a1')").fetchall() == []
        c1.execute("SELECT dispatch.task_complete(%s, 'a1', '{}')", (one[0]["task_id"],))
        again = c3.execute("SELECT slot FROM dispatch.task_claim('a1')").fetchall()
        assert again == [{"slot": one[0]["slot"]}]
    load = sql.execute(
        "SELECT active_tasks, slots_held FROM dispatch.agent_load WHERE agent_id = 'a1'"
    ).fetchone()
    assert load == {"active_tasks": 2, "slots_held": 2}


def test_an_agent_that_says_degraded_while_its_claim_runs_stays_degraded(
    db_url: str, sql: Conn
) -> None:
    """A claim reads its agent without holding off a heartbeat. A worker that shuts down says
    `degraded` while its last claim may still be under way; that claim must not write `ready`
    back, or the assigner gives the task the worker is about to release straight back to it."""
    sql.execute("SELECT dispatch.agent_upsert('a1')")
    sql.execute("SELECT dispatch.create_task('one')")
    with connect(db_url) as blocker, connect(db_url) as claimer, connect(db_url) as beat:
        claimer.execute("SET lock_timeout = '30s'")
        pid = claimer.execute("SELECT pg_backend_pid() AS pid").fetchone()
        assert pid is not None
        claimed: list[object] = []
        with blocker.transaction():
            # The claim reads its agent, takes the task, then waits to write its event.
            blocker.execute("LOCK TABLE dispatch.task_events IN ACCESS EXCLUSIVE MODE")
            thread = threading.Thread(target=lambda: claimed.extend(claimer.execute(
                "SELECT * FROM dispatch.task_claim('a1')").fetchall()))
            thread.start()
            deadline = time.monotonic() + 10
            while not sql.execute(
                "SELECT 1 FROM pg_locks WHERE pid = %s AND NOT granted "
                "AND relation = 'dispatch.task_events'::regclass", (pid["pid"],)
            ).fetchone():
                assert time.monotonic() < deadline, "the claim never reached its event"
                time.sleep(0.01)
            assert sql.execute(
                "SELECT 1 FROM pg_locks WHERE pid = %s AND granted "
                "AND relation = 'dispatch.agents'::regclass", (pid["pid"],)
            ).fetchone(), "the claim has not read its agent yet"
            beat.execute("SELECT dispatch.agent_heartbeat('a1', 'degraded')")
        thread.join(30)
    assert len(claimed) == 1
    row = sql.execute("SELECT status FROM dispatch.agents WHERE agent_id = 'a1'").fetchone()
    assert row == {"status": "degraded"}
