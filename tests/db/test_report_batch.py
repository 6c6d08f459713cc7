"""A batch of reports (dispatch.task_report_batch) answers and records each report as its own
call would, whichever way it is applied: the completions of tasks the agent holds go together in
one statement, every other report through its own function, in order."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

Conn = psycopg.Connection[dict[str, Any]]

BATCH = ("SELECT ord, status, error, task ->> 'status' AS now, task -> 'result' AS result"
         " FROM dispatch.task_report_batch('a1', %s, false, now()) ORDER BY ord")


def running(sql: Conn, agent: str, n: int) -> list[tuple[str, int]]:
    """n new tasks claimed and started by `agent`: their ids and leases."""
    for i in range(n):
        sql.execute("SELECT dispatch.create_task(%s)", (f"{agent} {i}",))
    rows = sql.execute(
        "SELECT task_id, lease FROM dispatch.task_claim(%s, p_max => %s, p_start => true)",
        (agent, n),
    ).fetchall()
    assert len(rows) == n
    return [(str(r["task_id"]), r["lease"]) for r in rows]


def history(sql: Conn, task_id: str) -> list[tuple[str, str, Any]]:
    rows = sql.execute(
        "SELECT event, actor, payload FROM dispatch.task_events WHERE task_id = %s ORDER BY id",
        (task_id,),
    ).fetchall()
    return [(r["event"], r["actor"], r["payload"]) for r in rows]


def test_completions_together_answer_and_record_as_each_alone(sql: Conn) -> None:
    sql.execute("SELECT dispatch.agent_upsert('a1', '{}', NULL, 10, 'ready')")
    sql.execute("SELECT dispatch.agent_upsert('a2', '{}', NULL, 10, 'ready')")
    (a, lease_a), (b, lease_b), (c, _), (d, _) = running(sql, "a1", 4)
    (other, _), = running(sql, "a2", 1)
    unknown = str(uuid.uuid4())
    reports = [
        {"task_id": a, "action": "complete", "lease": lease_a, "result": {"n": 1}},
        {"task_id": b, "action": "complete", "lease": lease_b % 2_147_483_647 + 1},  # stale
        {"task_id": c, "action": "progress", "percent": 50},
        {"task_id": d.upper(), "action": "complete"},  # no lease, no result
        {"task_id": other, "action": "complete", "result": {"n": 2}},  # a2's
        {"task_id": unknown, "action": "complete"},
        {"task_id": b, "action": "complete", "lease": "12.5"},  # malformed
    ]
    rows = sql.execute(BATCH, (Jsonb(reports),)).fetchall()
    assert [(r["ord"], r["status"], r["now"]) for r in rows] == [
        (1, 200, "completed"), (2, 409, "running"), (3, 200, "running"), (4, 200, "completed"),
        (5, 403, None), (6, 404, None), (7, 400, None),
    ]
    assert rows[0]["result"] == {"n": 1} and rows[3]["result"] is None
    assert "stale" in rows[1]["error"]
    for task_id, result in ((a, {"n": 1}), (d, None)):
        assert history(sql, task_id)[-1] == (
            "completed", "a1", {"assigned_agent": "a1", "result": result})
    # The refused ones changed nothing.
    for task_id, agent in ((b, "a1"), (other, "a2")):
        row = sql.execute(
            "SELECT status, assigned_agent FROM dispatch.tasks WHERE task_id = %s", (task_id,)
        ).fetchone()
        assert row == {"status": "running", "assigned_agent": agent}
        assert [e for e, _, _ in history(sql, task_id)] == ["created", "assigned", "started"]


def test_a_task_named_twice_gets_its_reports_in_their_order(sql: Conn) -> None:
    sql.execute("SELECT dispatch.agent_upsert('a1', '{}', NULL, 10, 'ready')")
    (a, _), (b, _), (c, _) = running(sql, "a1", 3)
    rows = sql.execute(BATCH, (Jsonb([
        {"task_id": a, "action": "fail", "error": "no", "retry_eligible": False},
        {"task_id": a.upper(), "action": "complete"},  # after its failure: 409
        {"task_id": b, "action": "complete", "result": 1},
        {"task_id": b, "action": "complete", "result": 1},  # a repeat: 200, as alone
        {"task_id": c, "action": "complete", "result": 2},
    ]),)).fetchall()
    assert [(r["status"], r["now"]) for r in rows] == [
        (200, "failed"), (409, "failed"), (200, "completed"), (200, "completed"),
        (200, "completed"),
    ]
    assert "failed" in [e for e, _, _ in history(sql, a)]
    assert "completed" not in [e for e, _, _ in history(sql, a)]
    assert [e for e, _, _ in history(sql, b)].count("completed") == 1


def test_completions_together_free_their_slots_and_wake_the_assigners(
    sql: Conn, db_url: str
) -> None:
    sql.execute("SELECT dispatch.agent_upsert('a1', '{}', NULL, 3, 'ready')")
    tasks = running(sql, "a1", 3)
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN dispatch_work")
        rows = sql.execute(BATCH, (Jsonb(
            [{"task_id": t, "action": "complete", "lease": lease} for t, lease in tasks]),)
        ).fetchall()
        assert [r["status"] for r in rows] == [200, 200, 200]
        assert [n.channel for n in listener.notifies(timeout=2, stop_after=1)] == [
            "dispatch_work"]
    load = sql.execute(
        "SELECT active_tasks, slots_held FROM dispatch.agent_load WHERE agent_id = 'a1'"
    ).fetchone()
    assert load == {"active_tasks": 0, "slots_held": 0}
