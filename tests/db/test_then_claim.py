"""A report and the agent's claim of its next task in one statement (dispatch.task_then_claim,
what a completion or failure with `next` runs, and dispatch.task_report_batch_then_claim, a batch
of reports with `next`): the report first, the claim seeing it; a claim that fails leaves the
report standing and says why; a report that fails claims nothing."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

Conn = psycopg.Connection[dict[str, Any]]

THEN = ("SELECT part, task ->> 'task_id' AS task_id, task ->> 'status' AS status, fresh, error"
        " FROM dispatch.task_then_claim(dispatch.task_complete(%s, %s, '{}'), %s, 1, true,"
        " now())")


def running(sql: Conn, title: str) -> str:
    sql.execute("SELECT dispatch.create_task(%s)", (title,))
    row = sql.execute("SELECT task_id FROM dispatch.task_claim('a1', p_start => true)").fetchone()
    assert row is not None
    return str(row["task_id"])


def test_the_completion_frees_the_slot_its_next_task_takes(sql: Conn) -> None:
    sql.execute("SELECT dispatch.agent_upsert('a1', '{}', NULL, 1, 'ready')")
    first = running(sql, "first")
    sql.execute("SELECT dispatch.create_task('second')")
    rows = sql.execute(THEN, (first, "a1", "a1")).fetchall()
    assert [(r["part"], r["status"]) for r in rows] == [("done", "completed"),
                                                         ("next", "running")]
    assert rows[0]["task_id"] == first and rows[1]["fresh"] is True
    load = sql.execute(
        "SELECT active_tasks, slots_held FROM dispatch.agent_load WHERE agent_id = 'a1'"
    ).fetchone()
    assert load == {"active_tasks": 1, "slots_held": 1}  # limit 1: the freed slot, taken again


def test_a_slot_refilled_by_the_next_claim_wakes_no_assigner(sql: Conn, db_url: str) -> None:
    """A freed slot wakes the assigners (NOTIFY dispatch_work) unless the agent's next claim,
    in the same statement, takes a task into it: its room is then what it was. A claim that
    takes nothing, or a failure whose task goes back in line, still wakes them."""
    sql.execute("SELECT dispatch.agent_upsert('a1', '{}', NULL, 2, 'ready')")
    first = running(sql, "first")
    sql.execute("SELECT dispatch.create_task('second', max_retries => 1)")
    then = ("SELECT part, task ->> 'task_id' AS task_id, task ->> 'status' AS status"
            " FROM dispatch.task_then_claim({}, 'a1', 1, true, now())")
    complete = "dispatch.task_complete(%s, 'a1', '{}', p_refill => true)"
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN dispatch_work")
        rows = sql.execute(then.format(complete), (first,)).fetchall()
        assert [r["part"] for r in rows] == ["done", "next"]  # the slot is taken again
        assert list(listener.notifies(timeout=0.5)) == []
        second = rows[1]["task_id"]
        rows = sql.execute(then.format(complete), (second,)).fetchall()
        assert [r["part"] for r in rows] == ["done"]  # nothing to take: the slot stays free
        assert [n.channel for n in listener.notifies(timeout=2, stop_after=1)] == [
            "dispatch_work"]
        third = running(sql, "third")
        sql.execute("SELECT dispatch.create_task('fourth')")
        list(listener.notifies(timeout=0.5))  # the create's
        fail = "dispatch.task_fail(%s, 'a1', 'flaky', p_refill => true)"
        sql.execute("UPDATE dispatch.tasks SET max_retries = 1 WHERE task_id = %s", (third,))
        rows = sql.execute(then.format(fail), (third,)).fetchall()
        assert (rows[0]["part"], rows[0]["status"]) == ("done", "pending")  # a retry
        assert [n.channel for n in listener.notifies(timeout=2, stop_after=1)] == [
            "dispatch_work"]
        # A plain completion (no claim follows) announces its slot as ever.
        fourth = rows[1]["task_id"]
        sql.execute("SELECT dispatch.task_complete(%s, 'a1', '{}')", (fourth,))
        assert [n.channel for n in listener.notifies(timeout=2, stop_after=1)] == [
            "dispatch_work"]


def test_a_caller_that_wakes_an_assigner_itself_is_not_announced(sql: Conn, db_url: str) -> None:
    """announce false (what a replica whose assigner runs passes, waking that assigner itself):
    neither a create nor a completion whose claim takes nothing sends NOTIFY dispatch_work. The
    same calls without it still do, a create in a later transaction too."""
    sql.execute("SELECT dispatch.agent_upsert('a1', '{}', NULL, 2, 'ready')")
    then = ("SELECT part FROM dispatch.task_then_claim("
            "dispatch.task_complete(%s, 'a1', '{}', p_refill => true), 'a1', 1, true, now(), %s)")
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN dispatch_work")
        made = sql.execute("SELECT (dispatch.task_create('quiet', announce => false)).created")
        assert made.fetchone() == {"created": True}
        row = sql.execute("SELECT task_id FROM dispatch.task_claim('a1', p_start => true)")
        quiet = row.fetchone()
        assert quiet is not None
        rows = sql.execute(then, (quiet["task_id"], False)).fetchall()
        assert [r["part"] for r in rows] == ["done"]  # nothing to take: the slot stays free
        assert list(listener.notifies(timeout=0.5)) == []
        loud = running(sql, "announced")  # dispatch.create_task: announced as ever
        assert [n.payload for n in listener.notifies(timeout=2, stop_after=1)] == ["created"]
        rows = sql.execute(then, (loud, True)).fetchall()
        assert [r["part"] for r in rows] == ["done"]
        assert [n.channel for n in listener.notifies(timeout=2, stop_after=1)] == [
            "dispatch_work"]


def test_a_failed_claim_leaves_the_report_standing_and_says_why(sql: Conn) -> None:
    sql.execute("SELECT dispatch.agent_upsert('a1', '{}', NULL, 2, 'ready')")
    first = running(sql, "first")
    sql.execute("SELECT dispatch.create_task('second')")
    rows = sql.execute(THEN, (first, "a1", "nobody")).fetchall()
    assert [r["part"] for r in rows] == ["done", "error"]
    assert "agent nobody is not registered" in rows[1]["error"]
    status = sql.execute("SELECT status::text FROM dispatch.tasks WHERE task_id = %s",
                         (first,)).fetchone()
    assert status == {"status": "completed"}
    pending = sql.execute("SELECT count(*) AS n FROM dispatch.tasks WHERE status = 'pending'")
    assert pending.fetchone() == {"n": 1}


def test_a_refused_report_claims_nothing(sql: Conn) -> None:
    sql.execute("SELECT dispatch.agent_upsert('a1', '{}', NULL, 2, 'ready')")
    sql.execute("SELECT dispatch.agent_upsert('a2', '{}', NULL, 2, 'ready')")
    first = running(sql, "first")
    sql.execute("SELECT dispatch.create_task('second')")
    with pytest.raises(psycopg.Error, match="agent a2 is not assigned"):  # 409
        sql.execute(THEN, (first, "a2", "a2"))
    status = sql.execute("SELECT status::text FROM dispatch.tasks WHERE task_id = %s",
                         (first,)).fetchone()
    assert status == {"status": "running"}
    pending = sql.execute("SELECT count(*) AS n FROM dispatch.tasks WHERE status = 'pending'")
    assert pending.fetchone() == {"n": 1}


BATCH = ("SELECT ord, status, part, task ->> 'task_id' AS task_id,"
         " task ->> 'status' AS task_status, fresh, error"
         " FROM dispatch.task_report_batch_then_claim(%s, %s::jsonb, false, now(), %s, %s, true)")


def reports(*items: tuple[str, str]) -> str:
    return "[" + ", ".join(f'{{"task_id": "{t}", "action": "{a}"}}' for t, a in items) + "]"


def test_a_batch_claims_after_the_report_that_asks_in_the_same_statement(sql: Conn) -> None:
    sql.execute("SELECT dispatch.agent_upsert('a1', '{}', NULL, 2, 'ready')")
    first, second = running(sql, "first"), running(sql, "second")
    sql.execute("SELECT dispatch.create_task('third')")
    rows = sql.execute(BATCH, ("a1", reports((first, "progress"), (second, "complete")), 2, 1)
                       ).fetchall()
    assert [(r["ord"], r["status"], r["part"], r["task_status"]) for r in rows] == [
        (1, 200, "report", "running"), (2, 200, "report", "completed"),
        (None, None, "next", "running")]
    assert rows[2]["fresh"] is True and rows[2]["task_id"] not in (first, second)


def test_a_batch_whose_asking_report_is_refused_claims_nothing(sql: Conn) -> None:
    sql.execute("SELECT dispatch.agent_upsert('a1', '{}', NULL, 2, 'ready')")
    first = running(sql, "first")
    sql.execute("SELECT dispatch.create_task('second')")
    rows = sql.execute(BATCH, ("a1", reports((first, "complete"), (first, "start")), 2, 1)
                       ).fetchall()
    # The second report (a start of a completed task) is a 409: no claim follows it.
    assert [(r["ord"], r["status"], r["part"]) for r in rows] == [(1, 200, "report"),
                                                                 (2, 409, "report")]
    pending = sql.execute("SELECT count(*) AS n FROM dispatch.tasks WHERE status = 'pending'")
    assert pending.fetchone() == {"n": 1}


def test_a_batch_whose_claim_fails_keeps_its_reports_and_says_why(sql: Conn) -> None:
    sql.execute("SELECT dispatch.agent_upsert('a1', '{}', NULL, 2, 'ready')")
    first = running(sql, "first")
    sql.execute("SELECT dispatch.create_task('second')")
    rows = sql.execute(BATCH, ("a1", reports((first, "complete")), 1, 0)).fetchall()
    assert [(r["status"], r["part"]) for r in rows] == [(200, "report"), (None, "error")]
    assert "max_tasks must be between 1 and 100" in rows[1]["error"]
    status = sql.execute("SELECT status::text FROM dispatch.tasks WHERE task_id = %s",
                         (first,)).fetchone()
    assert status == {"status": "completed"}


def test_a_batchs_freed_slots_are_announced_unless_its_claim_fills_them(
    sql: Conn, db_url: str
) -> None:
    """The slots a batch's completions free wake the assigners (NOTIFY dispatch_work) unless
    the claim that follows takes as many tasks as it asks for; when it takes fewer, when no
    claim follows (the asking report refused), or for a batch with no claim, they do."""
    sql.execute("SELECT dispatch.agent_upsert('a1', '{}', NULL, 2, 'ready')")
    first, second = running(sql, "first"), running(sql, "second")
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN dispatch_work")
        for title in ("third", "fourth", "fifth"):
            sql.execute("SELECT dispatch.create_task(%s)", (title,))
        list(listener.notifies(timeout=0.5))  # the creates'

        rows = sql.execute(BATCH, ("a1", reports((first, "complete"), (second, "complete")), 2,
                                   2)).fetchall()
        assert [r["part"] for r in rows] == ["report", "report", "next", "next"]  # both refilled
        assert list(listener.notifies(timeout=0.5)) == []

        third, fourth = rows[2]["task_id"], rows[3]["task_id"]
        rows = sql.execute(BATCH, ("a1", reports((third, "complete"), (fourth, "complete")), 2,
                                   2)).fetchall()
        assert [r["part"] for r in rows] == ["report", "report", "next"]  # one of two refilled
        assert [n.channel for n in listener.notifies(timeout=2, stop_after=1)] == [
            "dispatch_work"]

        fifth = rows[2]["task_id"]
        sql.execute("SELECT dispatch.create_task('sixth')")
        list(listener.notifies(timeout=0.5))
        rows = sql.execute(BATCH, ("a1", reports((fifth, "complete"), (fifth, "start")), 2, 2)
                           ).fetchall()
        assert [(r["status"], r["part"]) for r in rows] == [(200, "report"), (409, "report")]
        assert [n.channel for n in listener.notifies(timeout=2, stop_after=1)] == [
            "dispatch_work"]

        sixth = sql.execute("SELECT task_id FROM dispatch.task_claim('a1', p_start => true)")
        sixth_id = sixth.fetchone()
        assert sixth_id is not None
        seventh = running(sql, "seventh")
        list(listener.notifies(timeout=0.5))
        sql.execute("SELECT * FROM dispatch.task_report_batch('a1', %s::jsonb)",
                    (reports((str(sixth_id["task_id"]), "complete"), (seventh, "complete")),))
        assert [n.channel for n in listener.notifies(timeout=2, stop_after=1)] == [
            "dispatch_work"]
