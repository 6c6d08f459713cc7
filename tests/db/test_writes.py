"""What each step of a task's life writes, read from the server's own row counters: one version of
the task's row and its events, and no row that other tasks share. The agent's row is written only
by whoever gives it work, at most once per claim or per assigner round, and never by a task that
ends: ten workers of one agent finishing at once do not queue on it."""

from __future__ import annotations

from collections import Counter
from typing import Any

import psycopg
import pytest

Conn = psycopg.Connection[dict[str, Any]]


def writes(sql: Conn, statement: str, params: tuple[object, ...] = ()) -> Counter[str]:
    """Rows each dispatch table got (inserted or updated) from one autocommit statement; a
    partitioned table's partitions count as the table."""

    def now() -> Counter[str]:
        sql.execute("SELECT pg_stat_force_next_flush()")
        rows = sql.execute(
            "SELECT (SELECT relname FROM pg_class WHERE oid = coalesce(pg_partition_root(relid),"
            " relid)) AS relname, sum(n_tup_ins) AS ins, sum(n_tup_upd) AS upd"
            " FROM pg_stat_user_tables WHERE schemaname = 'dispatch' GROUP BY 1"
        ).fetchall()
        sql.execute("SELECT pg_stat_clear_snapshot()")
        out: Counter[str] = Counter()
        for r in rows:
            out[f"{r['relname']} insert"] = r["ins"]
            out[f"{r['relname']} update"] = r["upd"]
        return out

    before = now()
    sql.execute(statement, params)  # type: ignore[arg-type]
    after = now()
    return +(after - before)  # only what changed


def counted(sql: Conn, query: str, params: tuple[object, ...] = ()) -> int:
    """A statistics counter (the query's `n`) as it is now: this session's counts flushed first."""
    sql.execute("SELECT pg_stat_force_next_flush()")
    row = sql.execute(query, params).fetchone()  # type: ignore[arg-type]
    sql.execute("SELECT pg_stat_clear_snapshot()")
    assert row is not None
    return int(row["n"])


def hot_updates(sql: Conn) -> int:
    """HOT updates of the task table so far."""
    return counted(sql, "SELECT n_tup_hot_upd AS n FROM pg_stat_user_tables"
                        " WHERE relid = 'dispatch.tasks'::regclass")


def calls(sql: Conn, function: str) -> int:
    """Calls of a dispatch function counted so far (track_functions on in this session)."""
    return counted(sql, "SELECT coalesce(sum(calls), 0) AS n FROM pg_stat_user_functions"
                        " WHERE schemaname = 'dispatch' AND funcname = %s", (function,))


def test_each_step_writes_the_task_once_and_no_shared_row(sql: Conn) -> None:
    sql.execute("SELECT dispatch.agent_upsert('a1', '{}', NULL, 10, 'ready')")
    created = writes(sql, "SELECT dispatch.create_task('one')")
    assert created == Counter({"tasks insert": 1, "task_events insert": 1}), created

    claimed = writes(sql, "SELECT * FROM dispatch.task_claim('a1', p_start => true)")
    # Pending straight to running in one write, both events; the agent's row once.
    assert claimed == Counter({"tasks update": 1, "task_events insert": 2,
                               "agents update": 1}), claimed
    task_id = sql.execute("SELECT task_id FROM dispatch.tasks").fetchone()
    assert task_id is not None
    events = [r["event"] for r in sql.execute(
        "SELECT event FROM dispatch.task_events WHERE task_id = %s ORDER BY id",
        (task_id["task_id"],)).fetchall()]
    assert events == ["created", "assigned", "started"]

    completed = writes(sql, "SELECT dispatch.task_complete(%s, 'a1', '{}')",
                       (task_id["task_id"],))
    assert completed == Counter({"tasks update": 1, "task_events insert": 1}), completed

    sql.execute("SELECT dispatch.create_task('two')")
    sql.execute("SELECT * FROM dispatch.task_claim('a1', p_start => true)")
    two = sql.execute("SELECT task_id FROM dispatch.tasks WHERE title = 'two'").fetchone()
    assert two is not None
    failed = writes(sql, "SELECT dispatch.task_fail(%s, 'a1', 'boom', false)", (two["task_id"],))
    assert "agents update" not in failed, failed
    assert failed["tasks update"] == 1, failed


def test_an_assigner_round_writes_each_agent_once(sql: Conn) -> None:
    sql.execute("SELECT dispatch.agent_upsert('a1', '{}', NULL, 10, 'ready')")
    sql.execute("SELECT dispatch.agent_upsert('a2', '{}', NULL, 10, 'ready')")
    for i in range(6):
        sql.execute("SELECT dispatch.create_task(%s)", (f"t{i}",))
    round_ = writes(sql, "SELECT * FROM dispatch.task_assign(10)")
    assert round_["tasks update"] == 6, round_
    assert round_["agents update"] == 2, round_  # one write per agent, not one per task
    loads = {r["agent_id"]: (r["active_tasks"], r["slots_held"]) for r in sql.execute(
        "SELECT agent_id, active_tasks, slots_held FROM dispatch.agent_load").fetchall()}
    assert loads == {"a1": (3, 3), "a2": (3, 3)}, loads  # spread, each task in its own slot


def test_a_start_writes_once_and_a_refused_one_writes_nothing(sql: Conn) -> None:
    sql.execute("SELECT dispatch.agent_upsert('a1', '{}', NULL, 10, 'ready')")
    sql.execute("SELECT dispatch.agent_upsert('a2', '{}', NULL, 10, 'ready')")
    sql.execute("SELECT dispatch.create_task('one')")
    sql.execute("SELECT * FROM dispatch.task_assign(10)")
    row = sql.execute("SELECT task_id, assigned_agent, lease FROM dispatch.tasks").fetchone()
    assert row is not None and row["assigned_agent"] is not None
    task_id, holder, lease = row["task_id"], row["assigned_agent"], row["lease"]
    other = "a2" if holder == "a1" else "a1"

    def state() -> tuple[object, ...]:
        row = sql.execute(
            "SELECT status, updated_at, (SELECT count(*) FROM dispatch.task_events e"
            " WHERE e.task_id = t.task_id) AS events FROM dispatch.tasks t WHERE task_id = %s",
            (task_id,)).fetchone()
        assert row is not None
        return tuple(row.values())

    # Refused: another agent (403), a stale lease (409). Nothing is written.
    before = state()
    for agent, stale, code in ((other, None, "UD403"), (holder, lease % 1000 + 1, "UD409")):
        with pytest.raises(psycopg.Error) as refused:
            sql.execute("SELECT dispatch.task_start(%s, %s, p_lease => %s)",
                        (task_id, agent, stale))
        assert refused.value.sqlstate == code, refused.value
        assert state() == before

    started = writes(sql, "SELECT dispatch.task_start(%s, %s, p_lease => %s)",
                     (task_id, holder, lease))
    assert started == Counter({"tasks update": 1, "task_events insert": 1}), started
    # Started again (an answer lost): the running task, nothing written.
    again = writes(sql, "SELECT dispatch.task_start(%s, %s)", (task_id, holder))
    assert again == Counter(), again
    status = sql.execute("SELECT status FROM dispatch.tasks WHERE task_id = %s", (task_id,))
    assert status.fetchone() == {"status": "running"}
    events = [r["event"] for r in sql.execute(
        "SELECT event FROM dispatch.task_events WHERE task_id = %s ORDER BY id",
        (task_id,)).fetchall()]
    assert events == ["created", "assigned", "started"]

    # A start of a task that is not assigned: refused as a conflict, nothing written.
    sql.execute("SELECT dispatch.create_task('two')")
    two = sql.execute("SELECT task_id FROM dispatch.tasks WHERE title = 'two'").fetchone()
    assert two is not None
    with pytest.raises(psycopg.Error) as pending:
        sql.execute("SELECT dispatch.task_start(%s, NULL)", (two["task_id"],))
    assert pending.value.sqlstate == "UD409", pending.value


def test_a_heartbeat_writes_once_and_a_refused_one_writes_nothing(sql: Conn) -> None:
    sql.execute("SELECT dispatch.agent_upsert('a1', '{}', NULL, 10, 'ready')")
    sql.execute("SELECT dispatch.agent_upsert('a2', '{}', NULL, 10, 'ready')")
    sql.execute("SELECT dispatch.create_task('one')")
    sql.execute("SELECT dispatch.create_task('two')")
    claimed = sql.execute("SELECT task_id, lease FROM dispatch.task_claim('a1', p_start => true)"
                          " ORDER BY task_id LIMIT 1").fetchone()
    assert claimed is not None
    task_id, lease = claimed["task_id"], claimed["lease"]

    def state() -> tuple[object, ...]:
        row = sql.execute(
            "SELECT status, progress, updated_at, (SELECT count(*) FROM dispatch.task_events e"
            " WHERE e.task_id = t.task_id) AS events FROM dispatch.tasks t WHERE task_id = %s",
            (task_id,)).fetchone()
        assert row is not None
        return tuple(row.values())

    # Refused: another agent (403), a stale lease (409), a percent out of range (400). Nothing
    # is written.
    before = state()
    for agent, stale, percent, code in (("a2", None, 5, "UD403"), ("a1", lease % 1000 + 1, 5,
                                        "UD409"), ("a1", lease, 101, "UD400")):
        with pytest.raises(psycopg.Error) as refused:
            sql.execute("SELECT dispatch.task_progress(%s, %s, %s, p_lease => %s)",
                        (task_id, agent, percent, stale))
        assert refused.value.sqlstate == code, refused.value
        assert state() == before

    # The heartbeat of a running task by its agent: one HOT update and its event, in one
    # statement (its WHERE is the fence: no separate lock of the row, no check called).
    sql.execute("SET track_functions = 'pl'")
    hot_before, locks_before = hot_updates(sql), calls(sql, "task_lock")
    beat = writes(sql, "SELECT dispatch.task_progress(%s, 'a1', 40, 'm', p_lease => %s)",
                  (task_id, lease))
    assert beat == Counter({"tasks update": 1, "task_events insert": 1}), beat
    assert hot_updates(sql) == hot_before + 1
    assert calls(sql, "task_lock") == locks_before
    row = sql.execute("SELECT status, progress FROM dispatch.tasks WHERE task_id = %s",
                      (task_id,)).fetchone()
    assert row == {"status": "running", "progress": {"percent": 40.0, "message": "m"}}

    # A heartbeat of a task still assigned to its agent starts it first.
    sql.execute("SELECT * FROM dispatch.task_assign(10)")
    pushed = sql.execute("SELECT task_id, assigned_agent FROM dispatch.tasks"
                         " WHERE status = 'assigned'").fetchone()
    assert pushed is not None
    sql.execute("SELECT dispatch.task_progress(%s, %s, 10)",
                (pushed["task_id"], pushed["assigned_agent"]))
    assert calls(sql, "task_lock") == locks_before + 1
    events = [r["event"] for r in sql.execute(
        "SELECT event FROM dispatch.task_events WHERE task_id = %s ORDER BY id",
        (pushed["task_id"],)).fetchall()]
    assert events == ["created", "assigned", "started", "progress"]


def test_the_functions_writes_call_no_update_trigger_unless_a_slot_is_announced(sql: Conn) -> None:
    # The transition functions check the edge and write the event themselves: the give, the
    # start and a completion whose claim follows do not call the update trigger at all. A
    # completion with no claim after it calls it to announce the freed slot; a change by plain
    # SQL calls it for its check and its event, as before.
    sql.execute("SET track_functions = 'pl'")
    sql.execute("SELECT dispatch.agent_upsert('a1', '{}', NULL, 10, 'ready')")
    for title in ("one", "two", "three"):
        sql.execute("SELECT dispatch.create_task(%s)", (title,))
    before = calls(sql, "tasks_before_update")
    one = sql.execute("SELECT task_id FROM dispatch.task_claim('a1', p_start => true)").fetchone()
    assert one is not None
    sql.execute("SELECT * FROM dispatch.task_then_claim(dispatch.task_complete(%s, 'a1', '{}',"
                " p_refill => true), 'a1', 1, true, now())", (one["task_id"],))
    sql.execute("SELECT * FROM dispatch.task_assign(10)")
    pushed = sql.execute("SELECT task_id FROM dispatch.tasks WHERE status = 'assigned'").fetchone()
    assert pushed is not None
    sql.execute("SELECT dispatch.task_start(%s, 'a1')", (pushed["task_id"],))
    assert calls(sql, "tasks_before_update") == before

    sql.execute("SELECT dispatch.task_complete(%s, 'a1', '{}')", (pushed["task_id"],))
    assert calls(sql, "tasks_before_update") == before + 1
    with pytest.raises(psycopg.Error) as illegal:
        sql.execute("UPDATE dispatch.tasks SET status = 'running' WHERE task_id = %s",
                    (pushed["task_id"],))
    assert illegal.value.sqlstate == "UD409", illegal.value
    running = sql.execute("SELECT task_id FROM dispatch.tasks WHERE status = 'running'").fetchone()
    assert running is not None
    sql.execute("UPDATE dispatch.tasks SET status = 'cancelled' WHERE task_id = %s",
                (running["task_id"],))
    last = sql.execute("SELECT event, payload ->> 'via' AS via FROM dispatch.task_events"
                       " WHERE task_id = %s ORDER BY id DESC LIMIT 1", (running["task_id"],))
    assert last.fetchone() == {"event": "cancelled", "via": "sql"}


def test_a_tasks_history_is_read_from_its_own_index_entries(sql: Conn) -> None:
    # The event log's primary key leads with the task: the history of one task among many
    # reads that task's rows alone, in order, without a scan of the log.
    sql.execute("SELECT count(*) FROM (SELECT dispatch.create_task('t' || i)"
                " FROM generate_series(1, 2000) i) x")
    sql.execute("ANALYZE dispatch.task_events")
    one = sql.execute("SELECT task_id FROM dispatch.tasks LIMIT 1").fetchone()
    assert one is not None
    plan = sql.execute(
        "EXPLAIN (FORMAT JSON) SELECT * FROM dispatch.task_events WHERE task_id = %s ORDER BY id",
        (one["task_id"],)).fetchone()
    assert plan is not None
    text = str(plan)
    assert "Seq Scan" not in text and "Sort" not in text, text
    assert "task_events_default_pkey" in text, text
