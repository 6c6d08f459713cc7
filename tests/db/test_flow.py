"""Flow control in SQL: fair share across tenants, priority aging, concurrency keys and
rate limits, enforced by task_assign (push) and task_claim (pull) alike, and the DBA surface that
sets them."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import datetime
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from dispatch.db import CONNECT_KWARGS
from tests.factories import at

Conn = psycopg.Connection[dict[str, Any]]


def agent(sql: Conn, agent_id: str, max_concurrent: int = 1000) -> None:
    sql.execute(
        "SELECT dispatch.agent_upsert(%s, p_max_concurrent => %s)", (agent_id, max_concurrent)
    )


def assign(sql: Conn, batch: int = 10, now: datetime | None = None) -> list[dict[str, Any]]:
    return sql.execute(
        "SELECT a.task_id, a.agent_id, t.requester, t.title FROM"
        " dispatch.task_assign(%s, coalesce(%s::timestamptz, now())) a"
        " JOIN dispatch.tasks t USING (task_id)",
        (batch, now),
    ).fetchall()


def claim(sql: Conn, agent_id: str, now: datetime | None = None) -> list[dict[str, Any]]:
    return sql.execute(
        "SELECT task_id, requester, title FROM"
        " dispatch.task_claim(%s, p_now => coalesce(%s::timestamptz, now()))",
        (agent_id, now),
    ).fetchall()


def flood(sql: Conn, requester: str, n: int, **fields: object) -> None:
    """n tasks of one requester in one statement (a flood, as fast as the database takes it)."""
    sql.execute(
        "INSERT INTO dispatch.tasks (title, requester, priority, concurrency_key, rate_key,"
        " available_at)"
        " SELECT %s || '-' || g, %s, %s, %s, %s, coalesce(%s::timestamptz, now())"
        " FROM generate_series(1, %s) g",
        (requester, requester, fields.get("priority", 0), fields.get("concurrency_key"),
         fields.get("rate_key"), fields.get("available_at"), n),
    )


# -- fair share ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["push", "pull"])
def test_a_flood_does_not_starve_another_tenants_tasks(sql: Conn, mode: str) -> None:
    flood(sql, "alice", 1000)
    for i in range(10):
        sql.execute("SELECT dispatch.create_task(%s, requester => 'bob')", (f"bob-{i}",))
    agent(sql, "worker")
    order: list[str] = []
    while len(order) < 30:
        got = assign(sql) if mode == "push" else claim(sql, "worker")
        assert got, "work was left but nothing was assigned"
        order.extend(r["requester"] for r in got)
    assert Counter(order[:30])["bob"] == 10, order[:30]


def test_a_heavier_tenant_gets_its_weight_in_assignments(sql: Conn) -> None:
    sql.execute("SELECT dispatch.tenant_weight_set('alice', 3)")
    flood(sql, "alice", 300)
    flood(sql, "bob", 300)
    agent(sql, "worker")
    order: list[str] = []
    while len(order) < 40:
        order.extend(r["requester"] for r in assign(sql, 40 - len(order)))
    alice = Counter(order)["alice"]
    assert 29 <= alice <= 31, order  # 3 to 1


def test_the_owner_is_the_tenant_when_there_is_one(sql: Conn) -> None:
    # Three requesters flooding on behalf of one owner are one tenant; a fourth requester's single
    # task is not stuck behind their flood.
    for r in ("r1", "r2", "r3"):
        sql.execute(
            "INSERT INTO dispatch.tasks (title, requester, owner)"
            " SELECT 'x', %s, 'acme' FROM generate_series(1, 100)", (r,)
        )
    sql.execute("SELECT dispatch.create_task('mine', requester => 'dana')")
    sql.execute("UPDATE dispatch.config SET owner_filter_enabled = false")
    agent(sql, "worker")
    first = [r["requester"] for r in assign(sql, 5)]
    assert "dana" in first, first


# -- priority aging --------------------------------------------------------------------------------


def test_an_old_low_priority_task_overtakes_newer_urgent_work_once_aged_past_it(sql: Conn) -> None:
    sql.execute("UPDATE dispatch.config SET aging_ms = 60000")  # a level a minute
    sql.execute(
        "SELECT dispatch.create_task('old p0', requester => 'a', priority => 0,"
        " available_at => %s)", (at(0),)
    )
    sql.execute(
        "SELECT dispatch.create_task('p5 early', requester => 'b', priority => 5,"
        " available_at => %s)", (at(200),)
    )
    agent(sql, "worker", max_concurrent=1)
    # At 250 s the old task is at level 4, the p5 task at 5: priority still rules.
    assert [r["title"] for r in assign(sql, 1, at(250))] == ["p5 early"]
    sql.execute("UPDATE dispatch.tasks SET status = 'cancelled' WHERE title = 'p5 early'")
    sql.execute(
        "SELECT dispatch.create_task('p5 late', requester => 'b', priority => 5,"
        " available_at => %s)", (at(320),)
    )
    # At 6 minutes the old task has reached level 6 and goes before the p5 work (level 5).
    assert [r["title"] for r in assign(sql, 1, at(360))] == ["old p0"]
    levels = sql.execute("SELECT title, queue_priority FROM dispatch.tasks"
                         " WHERE title <> 'p5 early' ORDER BY title").fetchall()
    assert levels == [{"title": "old p0", "queue_priority": 6},
                      {"title": "p5 late", "queue_priority": 5}]


@pytest.mark.parametrize("mode", ["push", "pull"])
def test_aging_caps_at_ten_and_zero_turns_it_off(sql: Conn, mode: str) -> None:
    sql.execute("UPDATE dispatch.config SET aging_ms = 60000")
    sql.execute("SELECT dispatch.create_task('ancient', requester => 'a', available_at => %s)",
                (at(0),))
    sql.execute("SELECT dispatch.create_task('p10', requester => 'b', priority => 10,"
                " available_at => %s)", (at(0),))
    agent(sql, "worker", max_concurrent=1)
    # A day later the p0 task is at 10, not beyond: the p10 task that queued at the same instant
    # is not passed (first in line goes first among equals).
    sql.execute("SELECT dispatch.queue_age(%s, 100)", (at(86400),))
    levels = sql.execute(
        "SELECT title, queue_priority FROM dispatch.tasks ORDER BY title").fetchall()
    assert levels == [{"title": "ancient", "queue_priority": 10},
                      {"title": "p10", "queue_priority": 10}]
    sql.execute("UPDATE dispatch.config SET aging_ms = 0")
    sql.execute("SELECT dispatch.create_task('later p1', requester => 'c', priority => 1,"
                " available_at => %s)", (at(10),))
    sql.execute("UPDATE dispatch.tasks SET status = 'cancelled' WHERE title <> 'later p1'")
    sql.execute("SELECT dispatch.create_task('old p0', requester => 'd', available_at => %s)",
                (at(0),))
    got = assign(sql, 1, at(86400)) if mode == "push" else claim(sql, "worker", at(86400))
    assert [r["title"] for r in got] == ["later p1"]


# -- concurrency keys ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["push", "pull"])
def test_a_concurrency_key_caps_its_active_tasks(sql: Conn, mode: str) -> None:
    sql.execute("SELECT dispatch.concurrency_limit_set('repo-x', 3)")
    flood(sql, "alice", 10, concurrency_key="repo-x")
    flood(sql, "bob", 2)
    for i in range(5):
        agent(sql, f"w{i}")
    got: list[dict[str, Any]] = []
    for i in range(5):
        got += assign(sql, 100) if mode == "push" else claim(sql, f"w{i}")
    held = [r for r in got if r["requester"] == "alice"]
    assert len(held) == 3 and sum(r["requester"] == "bob" for r in got) == 2
    limit = sql.execute("SELECT * FROM dispatch.concurrency_limit_list()").fetchone()
    assert limit is not None and limit["active_tasks"] == 3
    hold = sql.execute(
        "SELECT reasons FROM dispatch.task_hold((SELECT task_id FROM dispatch.tasks"
        " WHERE status = 'pending' LIMIT 1))").fetchone()
    assert hold is not None and "concurrency key repo-x at 3/3" in hold["reasons"]
    # One finishes: exactly one more may go.
    done = held[0]["task_id"]
    sql.execute("SELECT dispatch.task_complete(%s, (SELECT assigned_agent FROM dispatch.tasks"
                " WHERE task_id = %s))", (done, done))
    more = assign(sql, 100) if mode == "push" else claim(sql, "w4") + claim(sql, "w3")
    assert len(more) == 1
    # Raising the cap lets more through; removing it lifts it.
    sql.execute("SELECT dispatch.concurrency_limit_set('repo-x', 5)")
    assert len(assign(sql, 100)) == 2
    assert sql.execute("SELECT dispatch.concurrency_limit_delete('repo-x') AS d").fetchone() == {
        "d": True}
    assert len(assign(sql, 100)) == 4  # the rest of the ten


def test_a_new_cap_counts_the_tasks_already_active(sql: Conn) -> None:
    flood(sql, "alice", 5, concurrency_key="k")
    agent(sql, "w")
    assert len(assign(sql, 2)) == 2
    sql.execute("SELECT dispatch.concurrency_limit_set('k', 2)")
    row = sql.execute("SELECT * FROM dispatch.concurrency_limit_list()").fetchone()
    assert row is not None and row["active_tasks"] == 2
    assert assign(sql) == []
    # Failing one (back to pending) frees its slot: counted by the status trigger, raw SQL too.
    sql.execute("UPDATE dispatch.tasks SET status = 'cancelled'"
                " WHERE task_id = (SELECT task_id FROM dispatch.tasks WHERE status = 'assigned'"
                " LIMIT 1)")
    assert len(assign(sql)) == 1


def test_a_cap_holds_under_concurrent_assigners_and_claims(db_url: str, sql: Conn) -> None:
    sql.execute("SELECT dispatch.concurrency_limit_set('k', 3)")
    flood(sql, "alice", 200, concurrency_key="k")
    for i in range(20):
        agent(sql, f"w{i}", max_concurrent=2)
    errors: list[BaseException] = []
    stop = threading.Event()

    def run(i: int) -> None:
        try:
            with psycopg.connect(db_url, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
                while not stop.is_set():
                    if i < 3:
                        conn.execute("SELECT * FROM dispatch.task_assign(10)")
                    else:
                        rows = conn.execute(
                            "SELECT task_id FROM dispatch.task_claim(%s)", (f"w{i}",)
                        ).fetchall()
                        for (task_id,) in rows:
                            conn.execute("SELECT dispatch.task_complete(%s, %s)",
                                         (task_id, f"w{i}"))
                    # Complete what the assigners pushed to this thread's agent.
                    for (task_id,) in conn.execute(
                        "SELECT task_id FROM dispatch.tasks WHERE status = 'assigned'"
                        " AND assigned_agent = %s", (f"w{i}",)
                    ).fetchall():
                        conn.execute("SELECT dispatch.task_complete(%s, %s)", (task_id, f"w{i}"))
                    left = conn.execute("SELECT count(*) FROM dispatch.tasks"
                                        " WHERE status <> 'completed'").fetchone()
                    if left == (0,):
                        stop.set()
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    # Replay the history: never more than 3 of the key active at once.
    events = sql.execute(
        "SELECT event FROM dispatch.task_events WHERE event IN ('assigned', 'completed')"
        " ORDER BY id").fetchall()
    active = peak = 0
    for e in events:
        active += 1 if e["event"] == "assigned" else -1
        peak = max(peak, active)
    assert peak == 3 and active == 0
    assert sql.execute("SELECT count(*) AS n FROM dispatch.tasks WHERE status = 'completed'"
                       ).fetchone() == {"n": 200}


# -- rate limits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["push", "pull"])
def test_a_rate_limit_lets_tasks_through_as_its_bucket_refills(sql: Conn, mode: str) -> None:
    sql.execute("SELECT dispatch.rate_limit_set('openai', 2, 0.5, %s)", (at(0),))
    flood(sql, "alice", 6, rate_key="openai", available_at=at(0))
    agent(sql, "w")

    def go(now: datetime) -> int:
        if mode == "push":
            return len(assign(sql, 100, now))
        n = 0
        while claim(sql, "w", now):
            n += 1
        return n

    assert go(at(0)) == 2  # a new bucket starts full
    assert go(at(1)) == 0  # half a token
    hold = sql.execute(
        "SELECT reasons FROM dispatch.task_hold((SELECT task_id FROM dispatch.tasks"
        " WHERE status = 'pending' LIMIT 1), %s)", (at(1),)).fetchone()
    assert hold is not None
    assert hold["reasons"] == ["rate key openai empty until 2030-01-01T12:00:02.000Z"]
    held = sql.execute("SELECT rule, key, tasks FROM dispatch.flow_held(%s) WHERE rule = 'rate'",
                       (at(1),)).fetchall()
    assert held == [{"rule": "rate", "key": "openai", "tasks": 4}]
    assert go(at(2)) == 1
    assert go(at(10)) == 2  # four seconds' refill, but the bucket holds two
    left = sql.execute("SELECT tokens FROM dispatch.rate_limit_list(%s)", (at(10),)).fetchone()
    assert left == {"tokens": 0}


def test_a_task_held_by_its_bucket_wakes_the_engine_when_it_refills(sql: Conn, db_url: str) -> None:
    sql.execute("SELECT dispatch.rate_limit_set('k', 1, 0.25, %s)", (at(0),))
    flood(sql, "alice", 2, rate_key="k", available_at=at(0))
    agent(sql, "w")
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN dispatch_due")
        assert len(assign(sql, 10, at(0))) == 1
        notes = [n for n in listener.notifies(timeout=5, stop_after=1)]
    assert float(notes[0].payload) == at(4).timestamp()


def test_a_cost_above_the_capacity_is_named_and_other_work_still_flows(sql: Conn) -> None:
    sql.execute("SELECT dispatch.rate_limit_set('k', 5, 1)")
    task = sql.execute("SELECT task_id FROM dispatch.create_task('big', requester => 'a')"
                       ).fetchone()
    assert task is not None
    sql.execute("UPDATE dispatch.tasks SET rate_key = 'k', cost = 10")
    sql.execute("SELECT dispatch.create_task('small', requester => 'a')")
    agent(sql, "w")
    assert [r["title"] for r in assign(sql)] == ["small"]
    hold = sql.execute("SELECT reasons FROM dispatch.task_hold(%s)", (task["task_id"],)).fetchone()
    assert hold == {"reasons": ["rate key k: cost 10 exceeds its capacity 5"]}


@pytest.mark.parametrize("mode", ["push", "pull"])
def test_a_rate_key_without_a_bucket_does_not_limit(sql: Conn, mode: str) -> None:
    # Like a concurrency key without a cap: a typo in a requester's rate key must not starve its
    # task for ever.
    flood(sql, "alice", 3, rate_key="opneai", available_at=at(0))
    agent(sql, "w")
    pending = sql.execute("SELECT task_id FROM dispatch.tasks LIMIT 1").fetchone()
    assert pending is not None
    hold = sql.execute("SELECT reasons FROM dispatch.task_hold(%s, %s)",
                       (pending["task_id"], at(0))).fetchone()
    assert hold == {"reasons": []}
    if mode == "push":
        assert len(assign(sql, 10, at(0))) == 3
    else:
        assert len(claim(sql, "w", at(0))) == 1
        assert len(claim(sql, "w", at(0))) == 1
        assert len(claim(sql, "w", at(0))) == 1


@pytest.mark.parametrize("change", ["delete", "enlarge"])
def test_deleting_or_enlarging_a_bucket_releases_its_tasks_at_once(
    sql: Conn, db_url: str, change: str
) -> None:
    sql.execute("SELECT dispatch.rate_limit_set('k', 1, 0.0001, %s)", (at(0),))
    flood(sql, "alice", 3, rate_key="k", available_at=at(0))
    agent(sql, "w")
    assert len(claim(sql, "w", at(0))) == 1
    assert claim(sql, "w", at(1)) == []  # the bucket is empty for hours
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN dispatch_work")
        if change == "delete":
            sql.execute("SELECT dispatch.rate_limit_delete('k')")
        else:
            sql.execute("SELECT dispatch.rate_limit_set('k', 3, 0.0001, %s)", (at(1),))
        assert [n.channel for n in listener.notifies(timeout=5, stop_after=1)] == ["dispatch_work"]
    # The very next claims get them, no refill needed.
    assert len(claim(sql, "w", at(1))) == 1
    assert len(claim(sql, "w", at(1))) == 1
    assert sql.execute("SELECT count(*) AS n FROM dispatch.tasks WHERE status = 'pending'"
                       ).fetchone() == {"n": 0}


def order_index_reads(sql: Conn) -> int:
    """Index entries read from the walk's index so far (the statistics flushed first)."""
    sql.execute("SELECT pg_stat_force_next_flush()")
    sql.execute("SELECT 1")  # the flush happens at the end of a transaction
    sql.execute("SELECT pg_stat_clear_snapshot()")
    row = sql.execute("SELECT idx_tup_read AS n FROM pg_stat_user_indexes"
                      " WHERE indexrelname = 'tasks_pending_order_idx'").fetchone()
    assert row is not None
    return int(row["n"])


def no_snapshot_but_ours(sql: Conn) -> None:
    """Wait until no other session of this database holds a snapshot. An autovacuum worker's
    ANALYZE can, for a second or two; while it does, the parked rows' old entries in the walk's
    index are not yet dead to everyone, so each scan reads them again instead of marking them
    dead once and skipping them from then on. Then a transaction id of ours is spent: a session
    recomputes who may still see an old row only once a transaction has ended since it last did."""
    for _ in range(600):
        row = sql.execute(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)"
        ).fetchone()
        if row == {"n": 0}:
            sql.execute("SELECT pg_current_xact_id()")
            return
        time.sleep(0.05)
    raise AssertionError("another session held a snapshot for 30 s")


def parked(sql: Conn) -> int:
    row = sql.execute("SELECT count(*) AS n FROM dispatch.tasks WHERE status = 'pending'"
                      " AND parked").fetchone()
    assert row is not None
    return int(row["n"])


@pytest.mark.parametrize("mode", ["push", "pull"])
def test_a_backlog_its_cap_holds_back_leaves_the_walk_and_comes_back_in_line(
    sql: Conn, mode: str
) -> None:
    sql.execute("SELECT dispatch.concurrency_limit_set('repo', 1)")
    flood(sql, "alice", 300, concurrency_key="repo", priority=5)
    flood(sql, "bob", 5)
    agent(sql, "w")

    def one() -> list[str]:
        got = assign(sql, 1) if mode == "push" else claim(sql, "w")
        return [r["title"] for r in got]

    assert one() == ["alice-1"]
    # The next walk passes the other 299 (the key is at its cap), parks them, and takes bob's.
    assert one() == ["bob-1"] and parked(sql) == 299
    no_snapshot_but_ours(sql)  # then this count's scan marks the parked rows' entries dead
    assert sql.execute("SELECT count(*) AS n FROM dispatch.pending_queue(now())").fetchone() == {
        "n": 4}
    before = order_index_reads(sql)
    assert one() == ["bob-2"]
    assert order_index_reads(sql) - before <= 2  # not the 299 it passed before
    # alice-1 ends: the first in line of the parked comes back, and is next.
    sql.execute("SELECT dispatch.task_complete(task_id, assigned_agent) FROM dispatch.tasks"
                " WHERE title = 'alice-1'")
    assert parked(sql) == 298
    assert one() == ["alice-2"]
    # A higher cap brings them all back; the walk parks again what it still holds back.
    sql.execute("SELECT dispatch.concurrency_limit_set('repo', 4)")
    assert parked(sql) == 0
    got = assign(sql, 100) if mode == "push" else claim(sql, "w") + claim(sql, "w") + claim(
        sql, "w") + claim(sql, "w")
    assert sorted(r["title"] for r in got if r["requester"] == "alice") == [
        "alice-3", "alice-4", "alice-5"]
    assert parked(sql) == 295
    sql.execute("SELECT dispatch.concurrency_limit_delete('repo')")
    assert parked(sql) == 0


def test_the_reaper_sweep_returns_parked_tasks_whose_key_has_room(sql: Conn) -> None:
    # A walk that counted just before a task of the key ended parks with no end left to unpark:
    # here a DBA parks them by hand, and the reaper's round brings back as many as there is room.
    sql.execute("SELECT dispatch.concurrency_limit_set('repo', 2)")
    flood(sql, "alice", 5, concurrency_key="repo")
    agent(sql, "w")
    assert len(assign(sql, 100)) == 2 and parked(sql) == 3
    sql.execute("SELECT dispatch.task_complete(task_id, assigned_agent) FROM dispatch.tasks"
                " WHERE status = 'assigned'")
    assert parked(sql) == 1
    sql.execute("UPDATE dispatch.tasks SET parked = true WHERE status = 'pending'")
    assert assign(sql, 100) == []
    sql.execute("SELECT * FROM dispatch.task_expire()")
    assert parked(sql) == 1
    assert len(assign(sql, 100)) == 2


# -- busy keys: assignments far from a limit do not queue on it ------------------------------------


def open_claim(db_url: str, agent_id: str) -> psycopg.Connection[dict[str, Any]]:
    """A connection inside a transaction that has claimed for `agent_id` and not committed; the
    caller checks what it got and ends it. lock_timeout turns a wait for another claim's lock
    into an error, so a claim that would queue is seen queueing."""
    conn = psycopg.connect(db_url, row_factory=dict_row, **CONNECT_KWARGS)  # type: ignore[arg-type]
    conn.autocommit = False
    conn.execute("SET LOCAL lock_timeout = '1s'")
    return conn


def claimed(conn: psycopg.Connection[dict[str, Any]], agent_id: str) -> list[Any]:
    return [r["task_id"] for r in conn.execute(
        "SELECT task_id FROM dispatch.task_claim(%s)", (agent_id,)).fetchall()]


@pytest.mark.parametrize(
    ("setup", "fields"),
    [("SELECT dispatch.concurrency_limit_set('k', 1000)", {"concurrency_key": "k"}),
     ("SELECT dispatch.rate_limit_set('k', 1000, 1)", {"rate_key": "k"})],
    ids=["concurrency", "rate"],
)
def test_claims_of_one_key_far_from_its_limit_do_not_wait_for_each_other(
    sql: Conn, db_url: str, setup: str, fields: dict[str, str]
) -> None:
    sql.execute(setup)
    flood(sql, "alice", 3, **fields)
    for i in range(3):
        agent(sql, f"w{i}")
    first, second = open_claim(db_url, "w0"), open_claim(db_url, "w1")
    try:
        a = claimed(first, "w0")
        b = claimed(second, "w1")  # with the first still open: no wait (lock_timeout would fail)
        assert len(a) == 1 and len(b) == 1 and a != b
        second.commit()
        first.commit()
    finally:
        first.close()
        second.close()
    assert len(claim(sql, "w2")) == 1
    left = sql.execute("SELECT coalesce(sum(tokens), 0) AS t FROM dispatch.rate_limit_list()"
                       ).fetchone()
    assert left is not None and (left["t"] == 0 or 996.9 < left["t"] <= 1000)


@pytest.mark.parametrize(
    ("setup", "fields"),
    [("SELECT dispatch.concurrency_limit_set('k', 3)", {"concurrency_key": "k"}),
     ("SELECT dispatch.rate_limit_set('k', 3, 0.001)", {"rate_key": "k"})],
    ids=["concurrency", "rate"],
)
def test_near_its_limit_a_claim_waits_for_the_one_before_and_the_limit_holds(
    sql: Conn, db_url: str, setup: str, fields: dict[str, str]
) -> None:
    sql.execute(setup)
    flood(sql, "alice", 5, **fields)
    for i in range(5):
        agent(sql, f"w{i}")
    assert len(claim(sql, "w0")) == 1 and len(claim(sql, "w1")) == 1
    first, second = open_claim(db_url, "w2"), open_claim(db_url, "w3")
    try:
        assert len(claimed(first, "w2")) == 1  # the last one the limit allows
        with pytest.raises(psycopg.errors.LockNotAvailable):
            claimed(second, "w3")  # counted exactly: it waits for the first to end
        second.rollback()
        first.commit()
    finally:
        first.close()
        second.close()
    assert claim(sql, "w3") == [] and claim(sql, "w4") == []
    active = sql.execute("SELECT count(*) AS n FROM dispatch.tasks WHERE status = 'assigned'"
                         ).fetchone()
    assert active == {"n": 3}


def claim_at_once(sql: Conn, db_url: str, p_max: int) -> None:
    """16 agents, each on its own connection, start claiming at the same instant (up to p_max
    tasks a claim) and keep what they get, until 20 claims in a row bring nothing."""
    for i in range(16):
        agent(sql, f"w{i}")
    errors: list[BaseException] = []
    start = threading.Barrier(16)

    def run(i: int) -> None:
        try:
            with psycopg.connect(db_url, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
                start.wait()
                misses = 0
                while misses < 20:
                    got = conn.execute("SELECT task_id FROM dispatch.task_claim(%s, p_max => %s)",
                                       (f"w{i}", p_max)).fetchall()
                    misses = 0 if got else misses + 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=100)
    assert not errors, [str(e) for e in errors]


def test_a_cap_holds_where_claims_cross_from_tickets_to_the_exact_count(
    db_url: str, sql: Conn
) -> None:
    # 64 tickets: far below a cap of 77 claims take a ticket each without waiting, from 14 active
    # tasks on they count exactly. 16 agents claim at once and keep what they get.
    sql.execute("SELECT dispatch.concurrency_limit_set('k', 77)")
    flood(sql, "alice", 160, concurrency_key="k")
    claim_at_once(sql, db_url, p_max=2)
    assigned = sql.execute("SELECT count(*) AS n FROM dispatch.task_events"
                           " WHERE event = 'assigned'").fetchone()
    assert assigned == {"n": 77}
    assert len(assign(sql, 100)) == 0
    sql.execute("SELECT dispatch.task_complete(task_id, assigned_agent) FROM dispatch.tasks"
                " WHERE status = 'assigned'")
    assert len(assign(sql, 100)) == 77


def test_four_agents_claiming_ten_at_once_under_one_key_each_get_ten(
    db_url: str, sql: Conn
) -> None:
    """Far below the cap, four agents of one key claim ten tasks each, their transactions open
    together (an SDK worker's batch each): every claim gets the ten it asked for, none falls
    short for want of a free ticket."""
    sql.execute("SELECT dispatch.concurrency_limit_set('k', 1000000)")
    flood(sql, "alice", 60, concurrency_key="k")
    conns = [psycopg.connect(db_url, **CONNECT_KWARGS) for _ in range(4)]  # type: ignore[arg-type]
    try:
        got = []
        for i, conn in enumerate(conns):
            agent(sql, f"w{i}")
            conn.execute("BEGIN")  # held open: its tickets stay taken while the next ones claim
            got.append(len(conn.execute(
                "SELECT task_id FROM dispatch.task_claim(%s, p_max => 10)", (f"w{i}",)
            ).fetchall()))
        assert got == [10, 10, 10, 10]
    finally:
        for conn in conns:
            conn.close()


def test_a_bucket_of_many_shards_lets_through_its_capacity_under_concurrent_claims(
    db_url: str, sql: Conn
) -> None:
    # 200 tokens in 16 shards of 12.5, barely refilling; costs 1 to 5. 16 agents claim at once.
    sql.execute("SELECT dispatch.rate_limit_set('k', 200, 0.0001)")
    sql.execute(
        "INSERT INTO dispatch.tasks (title, requester, rate_key, cost)"
        " SELECT 'call ' || g, 'alice', 'k', 1 + g % 5 FROM generate_series(1, 200) g")
    claim_at_once(sql, db_url, p_max=3)
    row = sql.execute("SELECT min(cost) AS smallest_left FROM dispatch.tasks"
                      " WHERE status = 'pending'").fetchone()
    spent = sql.execute("SELECT sum(cost) AS n FROM dispatch.tasks WHERE status = 'assigned'"
                        ).fetchone()
    assert row is not None and spent is not None
    # Never more than the bucket (plus its refill meanwhile); and what is left in it, pooled
    # from every shard, is less than any task still waiting would take.
    assert 200 - 5 < spent["n"] <= 200.01
    tokens = sql.execute("SELECT tokens FROM dispatch.rate_limit_list()").fetchone()
    assert tokens is not None and tokens["tokens"] < row["smallest_left"]
    assert abs(tokens["tokens"] - (200 - spent["n"])) < 0.01


def test_an_assignment_by_hand_is_refused_at_the_cap_and_takes_its_tokens(sql: Conn) -> None:
    sql.execute("SELECT dispatch.concurrency_limit_set('k', 1)")
    sql.execute("SELECT dispatch.rate_limit_set('r', 100, 0.0001)")
    flood(sql, "alice", 2, concurrency_key="k", rate_key="r")
    agent(sql, "w")
    hand = ("UPDATE dispatch.tasks SET status = 'assigned', assigned_agent = 'w'"
            " WHERE task_id = (SELECT task_id FROM dispatch.tasks WHERE status = 'pending'"
            " ORDER BY queue_at LIMIT 1)")
    sql.execute(hand)
    with pytest.raises(psycopg.Error) as err:
        sql.execute(hand)
    assert err.value.sqlstate == "UD409" and "concurrency key k is at its cap" in str(err.value)
    counts = sql.execute("SELECT status, count(*) AS n FROM dispatch.tasks GROUP BY status"
                         " ORDER BY status").fetchall()
    assert counts == [{"status": "pending", "n": 1}, {"status": "assigned", "n": 1}]
    tokens = sql.execute("SELECT tokens FROM dispatch.rate_limit_list()").fetchone()
    assert tokens is not None and 98.99 < tokens["tokens"] < 99.01


# -- the DBA surface -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "column"),
    [
        ("SELECT dispatch.create_task('t', requester => 'a', concurrency_key => '')",
         "concurrency_key"),
        ("SELECT dispatch.create_task('t', requester => 'a', rate_key => repeat('x', 257))",
         "rate_key"),
        ("SELECT dispatch.create_task('t', requester => 'a', cost => 0)", "cost"),
        ("SELECT dispatch.tenant_weight_set('a', 0)", "weight"),
        ("SELECT dispatch.tenant_weight_set('', 1)", "tenant"),
        ("SELECT dispatch.concurrency_limit_set('k', -1)", "max_active"),
        ("SELECT dispatch.rate_limit_set('k', 0.5, 1)", "capacity"),
        ("SELECT dispatch.rate_limit_set('k', 5, 0)", "refill_per_second"),
        # Values that used to be taken and then broke every assignment round, explain or the
        # tenant's creates (an overflowing wait or place in line).
        ("SELECT dispatch.create_task('t', requester => 'a', cost => 1000000001)", "cost"),
        ("SELECT dispatch.tenant_weight_set('a', 1e-12)", "weight"),
        ("SELECT dispatch.tenant_weight_set('a', 1e-300)", "weight"),
        ("SELECT dispatch.tenant_weight_set('a', 5e-324)", "weight"),
        ("SELECT dispatch.tenant_weight_set('a', 0.000999)", "weight"),
        ("SELECT dispatch.tenant_weight_set('a', 'NaN')", "weight"),
        ("SELECT dispatch.concurrency_limit_set('k', 1000001)", "max_active"),
        ("SELECT dispatch.rate_limit_set('k', 'NaN', 1)", "capacity"),
        ("SELECT dispatch.rate_limit_set('k', 1e13, 1e12)", "capacity"),
        ("SELECT dispatch.rate_limit_set('k', 1, 1e-300)", "refill_per_second"),
        ("SELECT dispatch.rate_limit_set('k', 5, 'Infinity')", "refill_per_second"),
        ("SELECT dispatch.rate_limit_set('k', 1e12, 1)", "refill_per_second"),  # 1e12 s to fill
        ("SELECT dispatch.rate_limit_set('k', 1000, 0.00000099)", "refill_per_second"),
    ],
)
def test_bad_flow_settings_are_refused_and_change_nothing(
    sql: Conn, call: str, column: str
) -> None:
    with pytest.raises(psycopg.Error) as err:
        sql.execute(call)  # type: ignore[call-overload]
    assert err.value.sqlstate == "UD400" and err.value.diag.column_name == column
    counts = sql.execute(
        "SELECT (SELECT count(*) FROM dispatch.tasks) + (SELECT count(*) FROM"
        " dispatch.tenant_weights) + (SELECT count(*) FROM dispatch.concurrency_limits)"
        " + (SELECT count(*) FROM dispatch.rate_limits) AS n").fetchone()
    assert counts == {"n": 0}


def test_fair_share_is_named_by_explain(sql: Conn) -> None:
    flood(sql, "alice", 3)
    last = sql.execute("SELECT task_id FROM dispatch.tasks ORDER BY queue_at DESC LIMIT 1"
                       ).fetchone()
    assert last is not None
    hold = sql.execute("SELECT * FROM dispatch.task_hold(%s)", (last["task_id"],)).fetchone()
    assert hold == {
        "tenant": "alice", "effective_priority": 0,
        "reasons": ["tenant alice's fair share: 2 of its tasks at priority 0 are ahead in line"],
    }


@pytest.mark.parametrize(
    ("statement", "constraint"),
    [
        ("INSERT INTO dispatch.tenant_weights (tenant, weight) VALUES ('a', 1e-12)",
         "tenant_weights_weight_range"),
        ("INSERT INTO dispatch.rate_limits (key, capacity, refill_per_second, shards)"
         " VALUES ('k', 1, 1e-300, 1)", "rate_limits_fill_range"),
        ("INSERT INTO dispatch.rate_limits (key, capacity, refill_per_second, shards)"
         " VALUES ('k', 1e12, 1, 16)", "rate_limits_fill_range"),
    ],
)
def test_the_tables_refuse_flow_values_out_of_range_from_psql(
    sql: Conn, statement: str, constraint: str
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation) as err:
        sql.execute(statement)  # type: ignore[call-overload]
    assert err.value.diag.constraint_name == constraint


def test_a_bad_value_leaves_the_bucket_or_weight_as_it_was(sql: Conn) -> None:
    sql.execute("SELECT dispatch.rate_limit_set('k', 10, 2)")
    sql.execute("SELECT dispatch.tenant_weight_set('a', 3)")
    for call in ("SELECT dispatch.rate_limit_set('k', 1, 1e-300)",
                 "SELECT dispatch.tenant_weight_set('a', 5e-324)"):
        with pytest.raises(psycopg.Error) as err:
            sql.execute(call)  # type: ignore[call-overload]
        assert err.value.sqlstate == "UD400"
    assert sql.execute("SELECT capacity, refill_per_second FROM dispatch.rate_limits").fetchall(
        ) == [{"capacity": 10, "refill_per_second": 2}]
    assert sql.execute("SELECT weight FROM dispatch.tenant_weights").fetchall() == [{"weight": 3}]


def test_the_most_extreme_accepted_values_break_no_other_work(sql: Conn, db_url: str) -> None:
    """The widest bucket, the slowest (an empty one takes the longest wait there may be), the
    lightest and heaviest tenants, a cap of 0 and the largest, the largest cost, a tenant's tasks
    at the end of time, and a bucket a DBA overdrew by hand: assignment of unrelated tasks, claims,
    explain, the metrics' reads and the wake-up announcements keep working."""
    sql.execute("SELECT dispatch.rate_limit_set('wide', 1e12, 1e12, %s)", (at(0),))
    sql.execute("SELECT dispatch.rate_limit_set('slow', 1e9, 1, %s)", (at(0),))
    sql.execute("SELECT dispatch.rate_limit_set('trickle', 1, 1e-9, %s)", (at(0),))
    sql.execute("SELECT dispatch.rate_limit_set('overdrawn', 1, 1e-9, %s)", (at(0),))
    sql.execute("UPDATE dispatch.rate_buckets SET tokens = -1e300 WHERE key = 'overdrawn'")
    sql.execute("SELECT dispatch.tenant_weight_set('light', 0.001)")
    sql.execute("SELECT dispatch.tenant_weight_set('heavy', 1000)")
    sql.execute("SELECT dispatch.concurrency_limit_set('paused', 0)")
    sql.execute("SELECT dispatch.concurrency_limit_set('open', 1000000)")

    def create(title: str, requester: str, **fields: object) -> None:
        sql.execute(
            "SELECT dispatch.create_task(%s, requester => %s, rate_key => %s, cost => %s,"
            " concurrency_key => %s, available_at => %s)",
            (title, requester, fields.get("rate_key"), fields.get("cost", 1),
             fields.get("concurrency_key"), fields.get("available_at", at(0))))

    for key, cost in (("wide", 1_000_000_000), ("slow", 1_000_000_000), ("trickle", 1),
                      ("overdrawn", 1)):
        for n in range(2):
            create(f"{key}-{n}", "light", rate_key=key, cost=cost)
    for n in range(3):
        create(f"paused-{n}", "heavy", concurrency_key="paused")
        create(f"open-{n}", "heavy", concurrency_key="open")
    end = datetime.fromisoformat("9998-12-31T23:59:00+00:00")
    for n in range(3):  # each 1,000 s after the last in line: past the end of time but for a clamp
        create(f"late-{n}", "light", available_at=end)
    for n in range(3):
        create(f"bob-{n}", "bob")
    agent(sql, "w")

    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN dispatch_due")
        given = {r["title"] for r in assign(sql, 100, at(0))}
        dues = [float(n.payload) for n in listener.notifies(timeout=5, stop_after=1)]
    assert {"bob-0", "bob-1", "bob-2", "open-0", "open-1", "open-2", "wide-0", "wide-1",
            "slow-0", "trickle-0"} <= given
    assert given.isdisjoint({"slow-1", "trickle-1", "overdrawn-0", "overdrawn-1",
                             "paused-0", "late-0"})
    # The longest wait any bucket can announce: one billion seconds (about 31.7 years).
    assert dues and at(0).timestamp() < dues[0] <= at(1e9).timestamp()

    create("bob-3", "bob")
    agent(sql, "v")  # (w would get back the tasks the assigner gave it first)
    assert [r["title"] for r in claim(sql, "v", at(1))] == ["bob-3"]
    for title, reason in (("slow-1", "rate key slow empty until 2061-09-09T13:46:40.000Z"),
                          ("trickle-1", "rate key trickle empty until 2061-09-09T13:46:40.000Z"),
                          ("overdrawn-0", "rate key overdrawn empty until 2061-09-09T13:46:40"),
                          ("paused-0", "concurrency key paused at 0/0")):
        hold = sql.execute("SELECT reasons FROM dispatch.task_hold((SELECT task_id FROM"
                           " dispatch.tasks WHERE title = %s), %s)", (title, at(0))).fetchone()
        assert hold is not None and any(r.startswith(reason) for r in hold["reasons"]), hold
    late = sql.execute("SELECT max(queue_at) AS q FROM dispatch.tasks WHERE title LIKE 'late-%%'"
                       ).fetchone()
    assert late is not None and late["q"].year == 9998
    held = sql.execute("SELECT rule, key, tasks FROM dispatch.flow_held(%s)"
                       " WHERE rule <> 'fair_share' ORDER BY rule, key", (at(1),)).fetchall()
    assert [(h["rule"], h["key"]) for h in held] == [
        ("concurrency", "paused"), ("rate", "overdrawn"), ("rate", "slow"), ("rate", "trickle")]
    assert len(sql.execute("SELECT * FROM dispatch.rate_limit_list(%s)", (at(1),)).fetchall()) == 4
