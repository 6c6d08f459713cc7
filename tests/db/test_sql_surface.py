"""What a DBA meets in psql: plain INSERTs, the status guard on raw UPDATEs, the DBA functions and
views."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

Conn = psycopg.Connection[dict[str, Any]]

ALL_STATUSES = ["blocked", "pending", "assigned", "running", "suspended", "review", "completed",
                "failed", "timed_out", "cancelled"]
LEGAL = {
    ("blocked", "pending"),
    ("blocked", "completed"),
    ("blocked", "cancelled"),
    ("pending", "blocked"),
    ("failed", "blocked"),
    ("timed_out", "blocked"),
    ("cancelled", "blocked"),
    ("assigned", "review"),
    ("running", "review"),
    ("running", "suspended"),
    ("suspended", "assigned"),
    ("suspended", "pending"),
    ("suspended", "failed"),
    ("suspended", "timed_out"),
    ("suspended", "completed"),
    ("suspended", "cancelled"),
    ("review", "completed"),
    ("review", "pending"),
    ("review", "failed"),
    ("review", "cancelled"),
    ("pending", "assigned"),
    ("pending", "completed"),
    ("pending", "cancelled"),
    ("assigned", "running"),
    ("assigned", "completed"),
    ("assigned", "failed"),
    ("assigned", "timed_out"),
    ("assigned", "pending"),
    ("assigned", "cancelled"),
    ("running", "completed"),
    ("running", "failed"),
    ("running", "timed_out"),
    ("running", "pending"),
    ("running", "cancelled"),
    ("failed", "pending"),
    ("timed_out", "pending"),
    ("cancelled", "pending"),
}


def _task_in(sql: Conn, status: str) -> str:
    """A task brought to `status` by raw SQL along legal edges."""
    sql.execute("INSERT INTO dispatch.agents (agent_id) VALUES ('a1') ON CONFLICT DO NOTHING")
    row = sql.execute(
        "INSERT INTO dispatch.tasks (title) VALUES ('x') RETURNING task_id"
    ).fetchone()
    assert row is not None
    task_id = str(row["task_id"])
    path = {
        "blocked": ["blocked"],
        "pending": [],
        "assigned": ["assigned"],
        "running": ["assigned", "running"],
        "review": ["assigned", "running", "review"],
        "suspended": ["assigned", "running", "suspended"],
        "completed": ["assigned", "running", "completed"],
        "failed": ["assigned", "failed"],
        "timed_out": ["assigned", "timed_out"],
        "cancelled": ["cancelled"],
    }[status]
    for step in path:
        sql.execute(
            "UPDATE dispatch.tasks SET status = %s,"
            " assigned_agent = CASE WHEN %s = 'assigned' THEN 'a1' ELSE assigned_agent END"
            " WHERE task_id = %s",
            (step, step, task_id),
        )
    return task_id


def test_plain_insert_gives_a_pending_task_with_created_event(sql: Conn) -> None:
    with psycopg.connect(sql.info.dsn, autocommit=True) as listener:
        listener.execute("LISTEN dispatch_work")
        row = sql.execute(
            "INSERT INTO dispatch.tasks (title) VALUES ('from psql') RETURNING *"
        ).fetchone()
        notes = list(listener.notifies(timeout=5, stop_after=1))
    assert row is not None
    assert row["status"] == "pending" and row["source"] == "sql"
    assert row["requester"] == sql.info.user and row["owner"] is None
    assert row["timeout_seconds"] == 300 and row["metadata"] == {}
    events = sql.execute(
        "SELECT event, actor FROM dispatch.task_events WHERE task_id = %s", (row["task_id"],)
    ).fetchall()
    assert events == [{"event": "created", "actor": sql.info.user}]
    assert [n.channel for n in notes] == ["dispatch_work"]


@pytest.mark.parametrize("value", ["[1, 2]", "3", '"half"', "null"])
def test_progress_written_from_psql_must_be_an_object(sql: Conn, value: str) -> None:
    """What the API and the dashboard read as progress is an object (or nothing): a DBA's
    UPDATE of anything else is refused, naming the constraint, instead of breaking the task's
    every later read."""
    row = sql.execute(
        "INSERT INTO dispatch.tasks (title) VALUES ('t') RETURNING task_id").fetchone()
    assert row is not None
    with pytest.raises(psycopg.errors.CheckViolation) as err:
        sql.execute("UPDATE dispatch.tasks SET progress = %s::jsonb WHERE task_id = %s",
                    (value, row["task_id"]))
    assert err.value.diag.constraint_name == "tasks_progress_object"
    sql.execute("UPDATE dispatch.tasks SET progress = '{\"percent\": 5}' WHERE task_id = %s",
                (row["task_id"],))
    sql.execute("UPDATE dispatch.tasks SET progress = NULL WHERE task_id = %s", (row["task_id"],))


# The checks a trigger makes on the columns a task is created with (tasks_values_checked), as
# their CHECK constraints made them: (column, a value it may not hold, the constraint).
CREATED_WITH = [
    ("title", "''", "tasks_title_length"),
    ("title", "repeat('x', 501)", "tasks_title_length"),
    ("description", "repeat('x', 65537)", "tasks_description_length"),
    ("priority", "11", "tasks_priority_range"),
    ("max_retries", "-1", "tasks_max_retries_range"),
    ("timeout_seconds", "0", "tasks_timeout_positive"),
    ("heartbeat_seconds", "0", "tasks_heartbeat_positive"),
    ("metadata", "'[]'::jsonb", "tasks_metadata_object"),
    ("idempotency_key", "''", "tasks_idempotency_key_length"),
    ("concurrency_key", "repeat('k', 257)", "tasks_concurrency_key_length"),
    ("rate_key", "''", "tasks_rate_key_length"),
    ("cost", "0", "tasks_cost_range"),
    ("approval", "'later'", "tasks_approval_kind"),
    ("waiting_for", "repeat('w', 65537)", "tasks_waiting_for_length"),
    ("feedback", "repeat('f', 65537)", "tasks_feedback_length"),
    ("trace_context", "jsonb_build_object('traceparent', repeat('0', 1100))",
     "tasks_trace_context_size"),
]


@pytest.mark.parametrize(("column", "bad", "constraint"), CREATED_WITH)
def test_a_dba_update_of_a_creation_column_is_checked_as_by_a_constraint(
    sql: Conn, column: str, bad: str, constraint: str
) -> None:
    """The values a task is created with are checked by a trigger, not by CHECK constraints that
    every assignment and completion would evaluate again; from psql an UPDATE that writes a bad
    one is refused as the constraint refused it (check_violation, its name, the column) and the
    row is left as it was."""
    row = sql.execute(
        "INSERT INTO dispatch.tasks (title) VALUES ('t') RETURNING *").fetchone()
    assert row is not None
    with pytest.raises(psycopg.errors.CheckViolation) as err:
        sql.execute(f"UPDATE dispatch.tasks SET {column} = {bad} WHERE task_id = %s",
                    (row["task_id"],))
    assert err.value.diag.constraint_name == constraint
    assert err.value.diag.column_name == column
    assert err.value.diag.message_primary == (
        f'new row for relation "tasks" violates check constraint "{constraint}"')
    after = sql.execute("SELECT * FROM dispatch.tasks WHERE task_id = %s",
                        (row["task_id"],)).fetchone()
    assert after == row


@pytest.mark.parametrize(("column", "bad", "constraint"), CREATED_WITH)
def test_a_dba_insert_of_a_bad_creation_value_is_refused(
    sql: Conn, column: str, bad: str, constraint: str
) -> None:
    """A plain INSERT is refused too, by the insert triggers' own checks, whose message says what
    to write instead (invalid input, naming the column)."""
    columns, values = ("title", bad) if column == "title" else (f"title, {column}", f"'t', {bad}")
    with pytest.raises(psycopg.Error) as err:
        sql.execute(f"INSERT INTO dispatch.tasks ({columns}) VALUES ({values})")
    assert err.value.sqlstate == "UD400"
    assert err.value.diag.column_name == column
    assert column.split("_")[0] in err.value.diag.message_primary
    assert sql.execute("SELECT count(*) AS n FROM dispatch.tasks").fetchone() == {"n": 0}


def test_insert_not_pending_is_refused(sql: Conn) -> None:
    with pytest.raises(psycopg.Error, match="a new task must be pending"):
        sql.execute("INSERT INTO dispatch.tasks (title, status) VALUES ('x', 'running')")


@pytest.mark.parametrize("old", ALL_STATUSES)
def test_every_status_edge_from_raw_sql(sql: Conn, old: str) -> None:
    for new in ALL_STATUSES:
        if new == old:
            continue
        task_id = _task_in(sql, old)
        before = sql.execute("SELECT count(*) AS n FROM dispatch.task_events").fetchone()
        update = (
            "UPDATE dispatch.tasks SET status = %s,"
            " assigned_agent = coalesce(assigned_agent, 'a1') WHERE task_id = %s"
        )
        if (old, new) in LEGAL:
            sql.execute(update, (new, task_id))
            after = sql.execute("SELECT count(*) AS n FROM dispatch.task_events").fetchone()
            assert after is not None and before is not None
            assert after["n"] == before["n"] + 1, f"{old} -> {new} wrote no event"
        else:
            with pytest.raises(psycopg.Error) as exc:
                sql.execute(update, (new, task_id))
            assert f"illegal task status transition from {old} to {new}" in str(exc.value)
            status = sql.execute(
                "SELECT status::text FROM dispatch.tasks WHERE task_id = %s", (task_id,)
            ).fetchone()
            assert status == {"status": old}


def test_raw_sql_transitions_take_slots(sql: Conn) -> None:
    _task_in(sql, "running")
    _task_in(sql, "assigned")
    _task_in(sql, "completed")
    load = sql.execute(
        "SELECT active_tasks, slots_held FROM dispatch.agent_load WHERE agent_id = 'a1'"
    ).fetchone()
    assert load == {"active_tasks": 2, "slots_held": 2}


def test_dba_functions_behave_like_the_api(sql: Conn) -> None:
    sql.execute("SELECT dispatch.agent_upsert('a1', '{code}', 'alice')")
    task = sql.execute(
        "SELECT * FROM dispatch.create_task('fix it', required_capabilities => '{Code}',"
        " owner => 'alice', requester => 'bob', priority => 4)"
    ).fetchone()
    assert task is not None
    assert task["required_capabilities"] == ["code"] and task["priority"] == 4
    cancelled = sql.execute(
        "SELECT status::text, completed_at IS NOT NULL AS done"
        " FROM dispatch.cancel_task(%s, 'dba', 'duplicate')",
        (task["task_id"],),
    ).fetchone()
    assert cancelled == {"status": "cancelled", "done": True}
    requeued = sql.execute(
        "SELECT status::text FROM dispatch.requeue_task(%s)", (task["task_id"],)
    ).fetchone()
    assert requeued == {"status": "pending"}
    drained = sql.execute("SELECT drained FROM dispatch.drain_agent('a1', true)").fetchone()
    assert drained == {"drained": True}
    assert sql.execute("SELECT * FROM dispatch.task_assign()").fetchall() == []
    sql.execute("SELECT dispatch.drain_agent('a1', false)")
    assigned = sql.execute("SELECT agent_id FROM dispatch.task_assign()").fetchall()
    assert assigned == [{"agent_id": "a1"}]
    events = sql.execute(
        "SELECT event, actor FROM dispatch.task_events WHERE task_id = %s ORDER BY id",
        (task["task_id"],),
    ).fetchall()
    assert [e["event"] for e in events] == ["created", "cancelled", "requeued", "assigned"]
    assert events[1]["actor"] == "dba"


def test_dba_function_argument_errors_are_clear(sql: Conn) -> None:
    with pytest.raises(psycopg.Error, match=r"priority must be between 0 and 10 \(got 42\)"):
        sql.execute("SELECT dispatch.create_task('t', priority => 42)")
    with pytest.raises(psycopg.Error, match="title must be 1 to 500 characters"):
        sql.execute("SELECT dispatch.create_task('')")
    with pytest.raises(psycopg.Error, match="max_retries must be between 0 and 100"):
        sql.execute("SELECT dispatch.create_task('t', max_retries => 1000)")
    with pytest.raises(psycopg.Error, match="timeout_seconds must be greater than 0"):
        sql.execute("SELECT dispatch.create_task('t', timeout_seconds => 0)")
    with pytest.raises(psycopg.Error, match="agent nobody not found"):
        sql.execute("SELECT dispatch.drain_agent('nobody')")
    assert sql.execute("SELECT count(*) AS n FROM dispatch.tasks").fetchone() == {"n": 0}


def test_views(sql: Conn) -> None:
    _task_in(sql, "pending")
    _task_in(sql, "running")
    depth = {r["status"]: r["count"] for r in sql.execute("SELECT * FROM dispatch.queue_depth")}
    assert depth["pending"] == 1 and depth["running"] == 1 and depth["completed"] == 0
    assert set(depth) == set(ALL_STATUSES)
    sql.execute(
        "UPDATE dispatch.tasks SET deadline_at = now() - interval '1 minute'"
        " WHERE status = 'running'"
    )
    overdue = sql.execute("SELECT status::text, reason FROM dispatch.overdue").fetchall()
    assert overdue == [{"status": "running", "reason": "deadline"}]
