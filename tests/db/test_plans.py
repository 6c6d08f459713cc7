"""Plan guards for the hot statements, at realistic sizes (10 k pending, 1 M terminal rows), on
whichever Postgres build the suite runs on (`make test` and `make test-distribution` run both).

What each hot call really does inside its plpgsql function is read from the server, not guessed:
the table and index counters (pg_stat_user_tables / _indexes) give the tuples each call read, on
every build; where the build has auto_explain (the distribution's), the plans of the nested
statements are checked too, above all for JIT, which stock servers turn on and which costs 50-90 ms
per execution once a plan's estimated cost passes jit_above_cost."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from dispatch.db import CONNECT_KWARGS
from tests import pg

pytestmark = pytest.mark.slow

PENDING = 10_000
TERMINAL = 1_000_000
ACTIVE = 1_000
AGENTS = 20

SEED = f"""
SET session_replication_role = replica;  -- bulk rows without their events: only sizes matter here
INSERT INTO dispatch.tasks (title, requester, source, status, timeout_seconds, priority,
                            assigned_agent, created_at, updated_at, available_at, assigned_at,
                            completed_at)
SELECT 'done', 'req-' || (i % 50), 'api', 'completed', 300, i % 11, 'agent-' || (i % {AGENTS}),
       now() - interval '3 days', now() - interval '2 days', now() - interval '3 days',
       now() - interval '3 days', now() - interval '2 days' + i * interval '1 ms'
FROM generate_series(1, {TERMINAL}) i;
INSERT INTO dispatch.tasks (title, requester, source, status, timeout_seconds, priority,
                            required_capabilities, created_at, updated_at, available_at,
                            queue_priority, queue_at, age_due_at)
SELECT 'todo', 'req-' || (i % 50), 'api', 'pending', 300, i % 11,
       CASE WHEN i % 2 = 0 THEN '{{code}}'::text[] ELSE '{{}}'::text[] END,
       now() - interval '1 hour' + i * interval '1 ms', now(), now() - interval '1 hour',
       i % 11, now() - interval '1 hour' + i * interval '1 ms',
       CASE WHEN i % 11 < 10 THEN now() + interval '1 minute' + i * interval '1 ms' END
FROM generate_series(1, {PENDING}) i;
INSERT INTO dispatch.tasks (title, requester, source, status, timeout_seconds, priority,
                            assigned_agent, slot, pushed, created_at, updated_at,
                            available_at, assigned_at, deadline_at)
SELECT 'busy', 'req', 'api',
       CASE WHEN i % 2 = 0 THEN 'running' ELSE 'assigned' END::dispatch.task_status,
       300, 0, 'agent-' || (i % {AGENTS}), i / {AGENTS} + 1, true,
       now() - interval '1 minute', now(),
       now() - interval '1 minute', now() - interval '1 minute',
       now() + interval '1 hour' + (i * 7919 % {ACTIVE}) * interval '1 s'  -- not in heap order
FROM generate_series(1, {ACTIVE}) i;
SET session_replication_role = origin;
INSERT INTO dispatch.agents (agent_id, capabilities, max_concurrent)
SELECT 'agent-' || i, '{{code}}', 1000 FROM generate_series(0, {AGENTS - 1}) i;
ALTER TABLE dispatch.tasks SET (autovacuum_enabled = false);
VACUUM ANALYZE dispatch.tasks;
VACUUM ANALYZE dispatch.agents;
"""

Conn = psycopg.Connection[dict[str, Any]]


@dataclass
class Reads:
    """What one call read from dispatch.tasks."""

    seq_scans: int
    index_tuples: dict[str, int]
    plans: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture(scope="module")
def big_db(pg_server: str) -> Iterator[str]:
    url = pg.clone_database(pg_server)
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in SEED.split(";\n"):
            if statement.strip():
                conn.execute(statement)  # type: ignore[call-overload]
    yield url
    pg.drop_database(pg_server, url)


@pytest.fixture
def conn(big_db: str) -> Iterator[Conn]:
    with psycopg.connect(big_db, row_factory=dict_row, **CONNECT_KWARGS) as c:  # type: ignore[arg-type]
        yield c


@pytest.fixture
def young(pg_server: str) -> Iterator[Conn]:
    """A session of a database of its own that has never been analyzed (as before autovacuum's
    first pass), with autovacuum off for the task table so that it stays so."""
    url = pg.clone_database(pg_server)
    try:
        with psycopg.connect(url, row_factory=dict_row, **CONNECT_KWARGS) as c:  # type: ignore[arg-type]
            c.execute("ALTER TABLE dispatch.tasks SET (autovacuum_enabled = false)")
            yield c
    finally:
        pg.drop_database(pg_server, url)


def _counters(conn: Conn) -> tuple[int, dict[str, int]]:
    conn.execute("SELECT pg_stat_force_next_flush()")
    table = conn.execute(
        "SELECT seq_scan FROM pg_stat_user_tables WHERE relid = 'dispatch.tasks'::regclass"
    ).fetchone()
    rows = conn.execute(
        "SELECT indexrelname AS name, idx_tup_read AS n FROM pg_stat_user_indexes"
        " WHERE relid = 'dispatch.tasks'::regclass"
    ).fetchall()
    assert table is not None
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return int(table["seq_scan"]), {r["name"]: int(r["n"]) for r in rows}


def _explains(conn: Conn) -> bool:
    """Turn on auto_explain for this session's nested statements, where the build has it."""
    try:
        conn.execute("LOAD 'auto_explain'")
    except psycopg.Error:
        return False
    conn.execute(
        "SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on;"
        "SET auto_explain.log_format = json; SET auto_explain.log_level = notice"
    )
    return True


def measure(conn: Conn, statement: str, params: tuple[object, ...] = (), runs: int = 8) -> Reads:
    """Run the statement `runs` times (past plpgsql's switch to a cached generic plan), each in a
    transaction that is rolled back; return what the last run read and the plans it used."""
    notices: list[str] = []
    explained = _explains(conn)
    for i in range(runs):
        last = i == runs - 1
        if last:
            before = _counters(conn)
            if explained:
                conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        with conn.transaction(force_rollback=True):
            conn.execute(statement, params)  # type: ignore[call-overload]
    after = _counters(conn)
    plans = []
    for note in notices:
        start = note.find("{")
        if start >= 0:
            plans.append(json.loads(note[start:]))
    return Reads(
        seq_scans=after[0] - before[0],
        index_tuples={
            k: v - before[1].get(k, 0) for k, v in after[1].items() if v != before[1].get(k, 0)
        },
        plans=plans,
    )


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def check_plans(reads: Reads) -> None:
    for entry in reads.plans:
        assert "JIT" not in entry, f"JIT compiled: {entry['Query Text']}"
        for node in nodes(entry["Plan"]):
            assert not (node["Node Type"] == "Seq Scan" and node.get("Relation Name") == "tasks"), (
                f"sequential scan of tasks in: {entry['Query Text']}"
            )
            assert not (node["Node Type"] == "Sort" and node.get("Plan Rows", 0) >= PENDING / 2), (
                f"sorts the pending rows in: {entry['Query Text']}"
            )


def pending_reads(reads: Reads) -> int:
    return sum(n for name, n in reads.index_tuples.items() if "pending" in name)


def a_task(conn: Conn, status: str) -> uuid.UUID:
    row = conn.execute(
        "SELECT task_id FROM dispatch.tasks WHERE status = %s LIMIT 1", (status,)
    ).fetchone()
    assert row is not None
    return uuid.UUID(str(row["task_id"]))


def test_claim_walks_the_pending_order_index(conn: Conn) -> None:
    # An agent with no task of its own: its claim takes from the queue.
    conn.execute("INSERT INTO dispatch.agents (agent_id, capabilities, max_concurrent)"
                 " VALUES ('agent-idle', '{code}', 1000) ON CONFLICT DO NOTHING")
    try:
        reads = measure(conn, "SELECT * FROM dispatch.task_claim('agent-idle')")
    finally:
        conn.execute("DELETE FROM dispatch.agents WHERE agent_id = 'agent-idle'")
    check_plans(reads)
    assert reads.seq_scans == 0
    assert 1 <= pending_reads(reads) <= 50, reads.index_tuples


def test_claim_finds_the_agents_own_tasks_among_its_active_ones_only(conn: Conn) -> None:
    """agent-0 holds 50 active tasks (25 pushed, not started) and 50,000 finished ones: its claim
    returns its oldest pushed task reading its active rows (to find its own tasks), none of its
    history and none of the other agents' tasks."""
    reads = measure(conn, "SELECT * FROM dispatch.task_claim('agent-0')")
    check_plans(reads)
    assert reads.seq_scans == 0
    assert sum(reads.index_tuples.values()) <= 3 * ACTIVE // AGENTS, reads.index_tuples


def test_a_full_agent_finds_its_slots_taken_from_its_own_active_rows(conn: Conn) -> None:
    """A claim finds which of the agent's slots are free from the agent's own active rows (index
    only), on the generic plan too, not from every agent's active tasks nor its history; a full
    agent gets nothing and reads no pending task."""
    conn.execute("UPDATE dispatch.agents SET max_concurrent = %s WHERE agent_id = 'agent-1'",
                 (ACTIVE // AGENTS,))
    conn.commit()
    try:
        reads = measure(conn, "SELECT * FROM dispatch.task_claim('agent-1')")
        got = conn.execute(
            "SELECT assigned_at < now() AS before FROM dispatch.task_claim('agent-1', p_max => 5)"
        ).fetchall()
        conn.rollback()
    finally:
        conn.execute("UPDATE dispatch.agents SET max_concurrent = 1000 WHERE agent_id = 'agent-1'")
        conn.commit()
    assert got and all(g["before"] for g in got), got  # only what was pushed to it already
    assert pending_reads(reads) == 0, reads.index_tuples
    check_plans(reads)
    assert reads.seq_scans == 0
    assert reads.index_tuples.get("tasks_active_deadline_idx", 0) == 0, reads.index_tuples
    assert sum(reads.index_tuples.values()) <= 3 * ACTIVE // AGENTS + 50, reads.index_tuples


def test_assign_reads_about_a_batch_not_the_queue(conn: Conn) -> None:
    reads = measure(conn, "SELECT * FROM dispatch.task_assign(100)")
    check_plans(reads)
    assert reads.seq_scans == 0
    assert pending_reads(reads) <= 1_000, reads.index_tuples


def test_assign_with_every_agent_at_its_limit_reads_no_task(conn: Conn) -> None:
    conn.execute("UPDATE dispatch.agents SET max_concurrent = %s", (ACTIVE // AGENTS,))
    try:
        reads = measure(conn, "SELECT * FROM dispatch.task_assign(100)")
    finally:
        conn.execute("UPDATE dispatch.agents SET max_concurrent = 1000")
    check_plans(reads)
    # The first pending entry (is anything waiting?), and no walk.
    assert reads.seq_scans == 0 and pending_reads(reads) <= 1, reads.index_tuples


@pytest.mark.parametrize(
    ("call", "status"),
    [
        ("SELECT * FROM dispatch.task_start(%s, (SELECT assigned_agent FROM dispatch.tasks"
         " WHERE task_id = %s))", "assigned"),
        ("SELECT * FROM dispatch.task_complete(%s, (SELECT assigned_agent FROM dispatch.tasks"
         " WHERE task_id = %s), '{}')", "running"),
        ("SELECT * FROM dispatch.task_fail(%s, (SELECT assigned_agent FROM dispatch.tasks"
         " WHERE task_id = %s), 'x')", "running"),
    ],
    ids=["start", "complete", "fail"],
)
def test_reports_touch_one_row(conn: Conn, call: str, status: str) -> None:
    task_id = a_task(conn, status)
    reads = measure(conn, call, (task_id, task_id))
    check_plans(reads)
    assert reads.seq_scans == 0
    assert sum(reads.index_tuples.values()) <= 10, reads.index_tuples


@pytest.mark.parametrize(
    "call",
    ["SELECT * FROM dispatch.task_expire()", "SELECT dispatch.next_due()",
     "SELECT dispatch.next_deadline()", "SELECT dispatch.next_available()"],
    ids=["expire", "next_due", "next_deadline", "next_available"],
)
def test_the_reapers_calls_read_no_pending_or_terminal_rows(conn: Conn, call: str) -> None:
    reads = measure(conn, call)
    check_plans(reads)
    assert reads.seq_scans == 0
    assert pending_reads(reads) <= 10, reads.index_tuples
    assert sum(reads.index_tuples.values()) <= 2 * ACTIVE, reads.index_tuples


@pytest.mark.parametrize(
    "call",
    ["SELECT dispatch.task_park_unmatched(now(), 1000)",
     "SELECT dispatch.task_report_unmatched(now(), 100, 1000)"],
    ids=["park", "report"],
)
def test_the_unmatched_sweep_and_report_read_their_share_of_the_line(conn: Conn, call: str) -> None:
    # Every pending task here could be taken: a walk of the whole line found nothing to park or
    # report and read all 10,000 every tick.
    reads = measure(conn, call)
    check_plans(reads)
    assert reads.seq_scans == 0
    assert 1_000 <= pending_reads(reads) <= 1_100, reads.index_tuples


def test_create_places_the_task_in_line_reading_its_tenants_last_one(conn: Conn) -> None:
    # Fair share reads where the tenant's last pending task at this priority stands (about 20 of
    # the pending rows): one probe of the tenant index, not a walk of the queue.
    reads = measure(
        conn, "SELECT * FROM dispatch.create_task('t', requester => 'req-7', priority => 7)"
    )
    check_plans(reads)
    assert reads.seq_scans == 0
    assert pending_reads(reads) <= 10, reads.index_tuples


def test_placing_behind_a_flood_in_a_young_database_reads_one_entry(young: Conn) -> None:
    # A young database (never analyzed, as before autovacuum's first pass) where one tenant has
    # flooded 2,000 tasks: the planner, told the tenant has a row or so, must still read only the
    # top of the tenant's index range, not aggregate over all of its tasks at each create.
    create = "SELECT * FROM dispatch.create_task(%s, requester => 'flood', priority => 3)"
    for i in range(2000):
        young.execute(create, (str(i),))
    reads = measure(young, create, ("t",))
    check_plans(reads)
    assert pending_reads(reads) <= 10, reads.index_tuples


@pytest.mark.parametrize("call", ["claim", "assign"])
def test_taking_a_task_deep_in_a_young_databases_line_reads_it_alone(
    young: Conn, call: str
) -> None:
    """A session that first claimed (or assigned) while its young database held one task plans
    the function's statements then, for as long as it lives. 2,000 tasks at priority 0 and one at
    priority 5 come after: the claim, or the assigner's round, takes the priority-5 task, the
    first in queue order, and locks it by its id. That lookup must be by the primary key, and not
    a scan for the id through a partial index of pending rows, in whose order this task comes
    after the other 2,000 (the plan a table of one task made cheapest: every lock read the line
    up to its task, 760 pages a lock in the REST lifecycle phase of the benchmark)."""
    young.execute("SELECT dispatch.agent_upsert('agent-young', '{}', NULL, 10, 'ready')")
    statement = {
        "claim": "SELECT task_id FROM dispatch.task_claim('agent-young')",
        "assign": "SELECT task_id FROM dispatch.task_assign(1)",
    }[call]
    young.execute("SELECT dispatch.create_task('first', requester => 'flood')")
    measure(young, statement)  # plans the function's statements in this session
    for i in range(2000):
        young.execute("SELECT dispatch.create_task(%s, requester => 'flood')", (str(i),))
    urgent = young.execute(
        "SELECT (dispatch.create_task('urgent', requester => 'flood', priority => 5))"
        ".task_id AS id"
    ).fetchone()
    assert urgent is not None
    taken = young.execute(statement).fetchall()
    young.rollback()
    assert [r["task_id"] for r in taken] == [urgent["id"]]
    reads = measure(young, statement)
    check_plans(reads)
    assert reads.seq_scans == 0
    assert pending_reads(reads) <= 10, reads.index_tuples


@pytest.mark.parametrize(
    "complete",
    ["SELECT * FROM dispatch.task_complete(%s, 'agent-young', '{}')",
     "SELECT * FROM dispatch.task_report_batch('agent-young', jsonb_build_array("
     "jsonb_build_object('task_id', %s::text, 'action', 'complete', 'result', '{}'::jsonb)))"],
    ids=["single", "batch"],
)
def test_a_completion_in_a_young_session_reads_its_task_alone(
    young: Conn, complete: str
) -> None:
    """A session that first completed tasks while its young database held a few, then completes
    one of the 600 tasks its agent holds, alone or in a batch of reports: the completion finds its
    task by the primary key, not among the agent's active rows (tasks_active_agent_idx) or every
    active row."""
    young.execute("SELECT dispatch.agent_upsert('agent-young', '{}', NULL, 1000, 'ready')")
    for _ in range(8):  # past plpgsql's switch to a generic plan
        young.execute("SELECT dispatch.create_task('small', requester => 'r')")
        got = young.execute(
            "SELECT task_id FROM dispatch.task_claim('agent-young', p_start => true)"
        ).fetchone()
        assert got is not None
        young.execute(complete, (got["task_id"],))
    young.execute("SELECT dispatch.create_task('t' || i, requester => 'r')"
                  " FROM generate_series(1, 600) i")
    for _ in range(6):
        young.execute("SELECT * FROM dispatch.task_claim('agent-young', p_max => 100)")
    young.commit()
    held = young.execute(
        "SELECT task_id FROM dispatch.tasks WHERE status = 'assigned' LIMIT 1"
    ).fetchone()
    assert held is not None
    reads = measure(young, complete, (held["task_id"],))
    check_plans(reads)
    assert reads.seq_scans == 0
    assert sum(reads.index_tuples.values()) <= 5, reads.index_tuples


def test_the_aging_sweep_reads_only_what_is_due(conn: Conn) -> None:
    reads = measure(conn, "SELECT dispatch.queue_age(now(), 100)")
    check_plans(reads)
    # The first pending entry (is anything waiting?), and no walk.
    assert reads.seq_scans == 0 and pending_reads(reads) <= 1, reads.index_tuples
    # Ten minutes on, every pending task below 10 is due: the sweep takes its 100 and stops.
    reads = measure(conn, "SELECT dispatch.queue_age(now() + interval '10 minutes', 100)")
    check_plans(reads)
    assert reads.seq_scans == 0
    assert pending_reads(reads) <= 300, reads.index_tuples


def test_the_stats_read_the_history_once_not_four_times(conn: Conn) -> None:
    # GET /api/v1/stats (and the dashboard's overview, and `dispatch top`): the counts by status
    # read every row once; the last hour comes from tasks_terminal_completed_idx (nothing there:
    # the history is two days old) and the dead letters from tasks_dead_letter_idx (none).
    from dispatch.store.insights import _STATS

    reads = measure(conn, _STATS.replace("%(now)s", "NULL"))
    assert reads.seq_scans <= 1, reads
    terminal = reads.index_tuples.get("tasks_terminal_completed_idx", 0)
    assert terminal == 0, reads.index_tuples


def test_the_dashboards_charts_read_only_the_last_hour(conn: Conn) -> None:
    # Per minute of the last hour: the terminal rows of that hour (none here: the history is two
    # days old) and the active rows, never the history or the queue.
    from dispatch.store.insights import _UI_SERIES

    reads = measure(conn, _UI_SERIES.replace("%(now)s", "NULL"))
    check_plans(reads)
    assert reads.seq_scans == 0
    assert pending_reads(reads) == 0, reads.index_tuples
    assert sum(reads.index_tuples.values()) <= 2 * ACTIVE, reads.index_tuples



def test_the_aging_check_reads_only_the_aging_index_up_to_now(conn: Conn) -> None:
    """Every claim and round asks whether some pending task's priority is due to rise. On the
    generic plan that question must read tasks_pending_aging_idx up to now, not every pending row
    through another index (the plan an EXISTS could get: 3 ms a claim with 10,000 pending)."""
    conn.execute("SET plan_cache_mode = force_generic_plan")
    try:
        reads = measure(conn, "SELECT dispatch.queue_aging_due(now())")
    finally:
        conn.execute("RESET plan_cache_mode")
    check_plans(reads)
    assert reads.seq_scans == 0
    assert set(reads.index_tuples) <= {"tasks_pending_aging_idx"}, reads.index_tuples
    assert reads.index_tuples.get("tasks_pending_aging_idx", 0) <= 1, reads.index_tuples
