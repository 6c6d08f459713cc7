"""What every chaos scenario must leave true, read from the database itself."""

from __future__ import annotations

from typing import Any

import psycopg

from tests.chaos.swarm import LIMIT, Swarm
from tests.history import replay

Sql = psycopg.Connection[dict[str, Any]]


def nothing_acknowledged_lost(sql: Sql, swarm: Swarm) -> None:
    """Every task answered 201/200 exists; every 200 complete is completed with its result."""
    rows = sql.execute(
        "SELECT task_id::text AS id, status::text, result FROM dispatch.tasks"
        " WHERE task_id = ANY (%s::uuid[])",
        (list(swarm.created),),
    ).fetchall()
    found = {r["id"]: r for r in rows}
    missing = sorted(set(swarm.created) - set(found))
    assert not missing, f"{len(missing)} acknowledged task(s) missing, e.g. {missing[:3]}"
    rows = sql.execute(
        "SELECT task_id::text AS id, status::text, result FROM dispatch.tasks"
        " WHERE task_id = ANY (%s::uuid[])",
        (list(swarm.completed),),
    ).fetchall()
    found = {r["id"]: r for r in rows}
    wrong = [
        (task_id, found.get(task_id))
        for task_id, result in swarm.completed.items()
        if task_id not in found
        or found[task_id]["status"] != "completed"
        or found[task_id]["result"] != result
    ]
    assert not wrong, f"{len(wrong)} acknowledged completion(s) not kept, e.g. {wrong[:3]}"


def loads_match_slots(sql: Sql) -> None:
    """Each agent's load as dispatch.agent_load shows it equals the recount of its assigned +
    running tasks, each of them holds a slot of its own, and none is over the agent's limit."""
    rows = sql.execute(
        """
        SELECT l.agent_id, l.active_tasks, l.slots_held, l.max_concurrent,
               (SELECT count(*) FROM dispatch.tasks t
                WHERE t.assigned_agent = l.agent_id AND t.status IN ('assigned', 'running')
                  AND t.slot BETWEEN 1 AND l.max_concurrent) AS recount
        FROM dispatch.agent_load l
        """
    ).fetchall()
    off = [r for r in rows
           if not r["active_tasks"] == r["slots_held"] == r["recount"] <= r["max_concurrent"]]
    assert not off, f"an agent's load differs from its slots: {off}"


def history_sound(sql: Sql, limit: int = LIMIT) -> None:
    """The event log replays without a double assignment, an agent over its limit or a report
    from an agent that did not hold the task."""
    events = sql.execute(
        "SELECT task_id, event, actor, payload FROM dispatch.task_events ORDER BY id"
    ).fetchall()
    r = replay(events, limit)
    assert not r.double, r.double[:3]
    assert not r.over_limit, r.over_limit[:3]
    assert not r.foreign_reports, r.foreign_reports[:3]


def no_server_errors(swarm: Swarm) -> None:
    """No 500 (nor any 5xx but 503), and no answer the scenario does not explain."""
    errors = [c for c in swarm.calls if (c.status or 0) >= 500 and c.status != 503]
    assert not errors, errors[:5]
    assert not swarm.unexpected, swarm.unexpected[:5]
    without_retry_after = [c for c in swarm.answered(503) if not c.retry_after]
    assert not without_retry_after, without_retry_after[:5]


def all_invariants(sql: Sql, swarm: Swarm) -> None:
    no_server_errors(swarm)
    nothing_acknowledged_lost(sql, swarm)
    loads_match_slots(sql)
    history_sound(sql)
