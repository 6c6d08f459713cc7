"""One async function per SQL call. Rows become structs here; no decisions are made here."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import msgspec
import psycopg
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from dispatch.db import translate
from dispatch.models import (
    Agent,
    AgentStatus,
    Assignment,
    Cursor,
    Expiry,
    NewTask,
    Stats,
    Task,
    TaskEvent,
    TaskFilter,
)
from dispatch.settings import AssignmentSettings

Conn = AsyncConnection[Any]
Row = Mapping[str, Any]
S = TypeVar("S", bound=msgspec.Struct)


def _convert(row: Row, kind: type[S]) -> S:
    return msgspec.convert(row, kind, from_attributes=False)


async def _rows(
    conn: Conn, query: str, params: Sequence[object] | Mapping[str, object]
) -> list[Row]:
    try:
        cur = await conn.execute(query, params)  # type: ignore[arg-type]
        return await cur.fetchall()
    except psycopg.Error as exc:
        raise translate(exc) from exc


async def _task(conn: Conn, query: str, params: Sequence[object] | Mapping[str, object]) -> Task:
    rows = await _rows(conn, query, params)
    return _convert(rows[0], Task)


def _jsonb(value: object) -> Jsonb | None:
    return None if value is None else Jsonb(value)


# -- tasks ----------------------------------------------------------------------------------------

_INSERT_TASK = """
INSERT INTO dispatch.tasks (title, description, requester, owner, required_capabilities, priority,
                            timeout_seconds, heartbeat_seconds, max_retries, metadata,
                            parent_task_id, available_at, source, idempotency_key)
VALUES (%(title)s, %(description)s, %(requester)s, %(owner)s, %(required_capabilities)s,
        %(priority)s, %(timeout_seconds)s, %(heartbeat_seconds)s, %(max_retries)s, %(metadata)s,
        %(parent_task_id)s, %(available_at)s, %(source)s, %(idempotency_key)s)
ON CONFLICT (requester, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING *
"""

_BY_IDEMPOTENCY_KEY = """
SELECT * FROM dispatch.tasks WHERE requester = %s AND idempotency_key = %s
"""


async def task_create(
    conn: Conn, new: NewTask, *, requester: str, idempotency_key: str | None
) -> tuple[Task, bool]:
    """Insert a task; with a repeated idempotency key return the existing one and False."""
    params = {
        "title": new.title,
        "description": new.description,
        "requester": requester,
        "owner": new.owner,
        "required_capabilities": list(new.required_capabilities),
        "priority": new.priority,
        "timeout_seconds": new.timeout_seconds,
        "heartbeat_seconds": new.heartbeat_seconds,
        "max_retries": new.max_retries,
        "metadata": Jsonb(new.metadata),
        "parent_task_id": new.parent_task_id,
        "available_at": new.available_at,
        "source": new.source,
        "idempotency_key": idempotency_key,
    }
    rows = await _rows(conn, _INSERT_TASK, params)
    if rows:
        return _convert(rows[0], Task), True
    rows = await _rows(conn, _BY_IDEMPOTENCY_KEY, (requester, idempotency_key))
    return _convert(rows[0], Task), False


async def task_get(conn: Conn, task_id: uuid.UUID) -> Task | None:
    rows = await _rows(conn, "SELECT * FROM dispatch.tasks WHERE task_id = %s", (task_id,))
    return _convert(rows[0], Task) if rows else None


_LIST_TASKS = """
SELECT * FROM dispatch.tasks
WHERE (%(statuses)s::dispatch.task_status[] IS NULL OR status = ANY (%(statuses)s))
  AND (%(requester)s::text IS NULL OR requester = %(requester)s)
  AND (%(owner)s::text IS NULL OR owner = %(owner)s)
  AND (%(assignee)s::text IS NULL OR assigned_agent = %(assignee)s)
  AND (%(capability)s::text IS NULL OR required_capabilities @> ARRAY[%(capability)s::text])
  AND (%(source)s::text IS NULL OR source = %(source)s)
  AND (%(parent)s::uuid IS NULL OR parent_task_id = %(parent)s)
  AND (%(c_priority)s::integer IS NULL
       OR priority < %(c_priority)s
       OR priority = %(c_priority)s AND (created_at, task_id) > (%(c_created)s, %(c_id)s::uuid))
ORDER BY priority DESC, created_at, task_id
LIMIT %(limit)s
"""


async def task_list(
    conn: Conn, filters: TaskFilter, *, limit: int, after: Cursor | None
) -> list[Task]:
    params = {
        "statuses": [str(s) for s in filters.statuses] if filters.statuses else None,
        "requester": filters.requester,
        "owner": filters.owner,
        "assignee": filters.assignee,
        "capability": filters.capability.strip().lower() if filters.capability else None,
        "source": filters.source,
        "parent": filters.parent_task_id,
        "c_priority": after.priority if after else None,
        "c_created": after.created_at if after else None,
        "c_id": after.task_id if after else None,
        "limit": limit,
    }
    return [_convert(r, Task) for r in await _rows(conn, _LIST_TASKS, params)]


async def task_events(conn: Conn, task_id: uuid.UUID) -> list[TaskEvent]:
    rows = await _rows(
        conn, "SELECT * FROM dispatch.task_events WHERE task_id = %s ORDER BY id", (task_id,)
    )
    return [_convert(r, TaskEvent) for r in rows]


async def task_claim(
    conn: Conn, agent_id: str, capabilities: Sequence[str] | None, now: datetime | None
) -> Task | None:
    rows = await _rows(
        conn,
        "SELECT * FROM dispatch.task_claim(%s, %s, coalesce(%s, now()))",
        (agent_id, list(capabilities) if capabilities is not None else None, now),
    )
    return _convert(rows[0], Task) if rows else None


async def task_assign(conn: Conn, batch: int, now: datetime | None) -> list[Assignment]:
    rows = await _rows(
        conn, "SELECT * FROM dispatch.task_assign(%s, coalesce(%s, now()))", (batch, now)
    )
    return [_convert(r, Assignment) for r in rows]


async def task_start(conn: Conn, task_id: uuid.UUID, agent_id: str, now: datetime | None) -> Task:
    return await _task(
        conn,
        "SELECT * FROM dispatch.task_start(%s, %s, coalesce(%s, now()))",
        (task_id, agent_id, now),
    )


async def task_progress(
    conn: Conn,
    task_id: uuid.UUID,
    agent_id: str,
    *,
    percent: float | None,
    message: str | None,
    data: object,
    now: datetime | None,
) -> Task:
    return await _task(
        conn,
        "SELECT * FROM dispatch.task_progress(%s, %s, %s::real, %s, %s, coalesce(%s, now()))",
        (task_id, agent_id, percent, message, _jsonb(data), now),
    )


async def task_complete(
    conn: Conn,
    task_id: uuid.UUID,
    actor: str,
    result: object,
    *,
    admin: bool,
    now: datetime | None,
) -> Task:
    return await _task(
        conn,
        "SELECT * FROM dispatch.task_complete(%s, %s, %s, %s, coalesce(%s, now()))",
        (task_id, actor, _jsonb(result), admin, now),
    )


async def task_fail(
    conn: Conn,
    task_id: uuid.UUID,
    agent_id: str,
    error: str | None,
    retry_eligible: bool,
    now: datetime | None,
) -> Task:
    return await _task(
        conn,
        "SELECT * FROM dispatch.task_fail(%s, %s, %s, %s, coalesce(%s, now()))",
        (task_id, agent_id, error, retry_eligible, now),
    )


async def task_cancel(
    conn: Conn,
    task_id: uuid.UUID,
    actor: str,
    reason: str | None,
    *,
    admin: bool,
    now: datetime | None,
) -> Task:
    return await _task(
        conn,
        "SELECT * FROM dispatch.task_cancel(%s, %s, %s, %s, coalesce(%s, now()))",
        (task_id, actor, reason, admin, now),
    )


async def task_update(
    conn: Conn,
    task_id: uuid.UUID,
    actor: str,
    *,
    metadata_patch: dict[str, object] | None,
    priority: int | None,
    admin: bool,
    now: datetime | None,
) -> Task:
    return await _task(
        conn,
        "SELECT * FROM dispatch.task_update(%s, %s, %s, %s, %s, coalesce(%s, now()))",
        (task_id, actor, _jsonb(metadata_patch), priority, admin, now),
    )


async def task_requeue(conn: Conn, task_id: uuid.UUID, actor: str, now: datetime | None) -> Task:
    return await _task(
        conn,
        "SELECT * FROM dispatch.task_requeue(%s, %s, coalesce(%s, now()))",
        (task_id, actor, now),
    )


async def task_expire(conn: Conn, now: datetime | None, limit: int) -> list[Expiry]:
    rows = await _rows(
        conn, "SELECT * FROM dispatch.task_expire(coalesce(%s, now()), %s)", (now, limit)
    )
    return [_convert(r, Expiry) for r in rows]


async def task_report_unmatched(conn: Conn, now: datetime | None, limit: int) -> int:
    rows = await _rows(
        conn, "SELECT dispatch.task_report_unmatched(coalesce(%s, now()), %s) AS n", (now, limit)
    )
    return int(rows[0]["n"])


async def next_due(conn: Conn, now: datetime | None) -> datetime | None:
    rows = await _rows(conn, "SELECT dispatch.next_due(coalesce(%s, now())) AS at", (now,))
    at: datetime | None = rows[0]["at"]
    return at


async def task_prune(conn: Conn, before: datetime, limit: int) -> int:
    rows = await _rows(conn, "SELECT dispatch.task_prune(%s, %s) AS n", (before, limit))
    return int(rows[0]["n"])


# -- agents ---------------------------------------------------------------------------------------

_AGENT_COLUMNS = """
a.agent_id, a.capabilities, a.owner, a.status, a.policy,
coalesce(a.max_concurrent, c.max_concurrent_per_agent) AS max_concurrent,
a.active_count AS active_tasks, a.drained, a.source, a.last_assigned_at, a.last_seen_at,
a.updated_at
"""


async def _agent(conn: Conn, source: str, params: Sequence[object]) -> Agent:
    query = f"SELECT {_AGENT_COLUMNS} FROM {source} a CROSS JOIN dispatch.config c"
    rows = await _rows(conn, query, params)
    return _convert(rows[0], Agent)


async def agent_upsert(
    conn: Conn,
    agent_id: str,
    *,
    capabilities: Sequence[str] | None,
    owner: str | None,
    max_concurrent: int | None,
    status: AgentStatus | None,
    policy: str | None = None,
    source: str = "registry",
    now: datetime | None = None,
) -> Agent:
    return await _agent(
        conn,
        "dispatch.agent_upsert(%s, %s, %s, %s, %s, %s, %s, coalesce(%s, now()))",
        (
            agent_id,
            list(capabilities) if capabilities is not None else None,
            owner,
            max_concurrent,
            str(status) if status else None,
            policy,
            source,
            now,
        ),
    )


async def agent_heartbeat(
    conn: Conn, agent_id: str, status: AgentStatus | None, now: datetime | None
) -> Agent:
    return await _agent(
        conn,
        "dispatch.agent_heartbeat(%s, %s, coalesce(%s, now()))",
        (agent_id, str(status) if status else None, now),
    )


async def agent_drain(conn: Conn, agent_id: str, drained: bool, now: datetime | None) -> Agent:
    return await _agent(
        conn, "dispatch.agent_drain(%s, %s, coalesce(%s, now()))", (agent_id, drained, now)
    )


async def agent_stop(conn: Conn, agent_id: str, now: datetime | None) -> int:
    rows = await _rows(
        conn, "SELECT dispatch.agent_stop(%s, coalesce(%s, now())) AS n", (agent_id, now)
    )
    return int(rows[0]["n"])


async def agent_get(conn: Conn, agent_id: str) -> Agent | None:
    rows = await _rows(
        conn,
        f"SELECT {_AGENT_COLUMNS} FROM dispatch.agents a CROSS JOIN dispatch.config c"
        " WHERE a.agent_id = %s",
        (agent_id,),
    )
    return _convert(rows[0], Agent) if rows else None


async def agent_list(conn: Conn) -> list[Agent]:
    rows = await _rows(
        conn,
        f"SELECT {_AGENT_COLUMNS} FROM dispatch.agents a CROSS JOIN dispatch.config c"
        " ORDER BY a.agent_id",
        (),
    )
    return [_convert(r, Agent) for r in rows]


# -- configuration and statistics -----------------------------------------------------------------

_APPLY_CONFIG = """
UPDATE dispatch.config SET
    default_timeout_seconds = greatest(1, %(timeout)s / 1000),
    max_concurrent_per_agent = %(max_concurrent)s,
    owner_filter_enabled = %(owner_filter)s,
    retry_backoff_ms = %(backoff)s,
    retry_backoff_max_ms = %(backoff_max)s,
    wake_timeout_ms = %(wake)s,
    unmatched_repeat_ms = %(unmatched)s,
    updated_at = now()
WHERE (default_timeout_seconds, max_concurrent_per_agent, owner_filter_enabled, retry_backoff_ms,
       retry_backoff_max_ms, wake_timeout_ms, unmatched_repeat_ms)
   IS DISTINCT FROM (greatest(1, %(timeout)s / 1000), %(max_concurrent)s, %(owner_filter)s,
                     %(backoff)s, %(backoff_max)s, %(wake)s, %(unmatched)s)
"""


async def config_apply(conn: Conn, a: AssignmentSettings) -> None:
    """Write the assignment settings the SQL functions read (a no-op when unchanged)."""
    await _rows_none(
        conn,
        _APPLY_CONFIG,
        {
            "timeout": a.default_timeout_ms,
            "max_concurrent": a.max_concurrent_per_agent,
            "owner_filter": a.owner_filter_enabled,
            "backoff": a.retry_backoff_ms,
            "backoff_max": a.retry_backoff_max_ms,
            "wake": a.wake_timeout_ms,
            "unmatched": a.unmatched_repeat_ms,
        },
    )


async def _rows_none(conn: Conn, query: str, params: Mapping[str, object]) -> None:
    try:
        await conn.execute(query, params)  # type: ignore[arg-type]
    except psycopg.Error as exc:
        raise translate(exc) from exc


_STATS = """
WITH clock AS (SELECT coalesce(%(now)s::timestamptz, now()) AS now),
recent AS (
    SELECT status, created_at, assigned_at, completed_at FROM dispatch.tasks, clock
    WHERE status IN ('completed', 'failed', 'timed_out', 'cancelled')
      AND completed_at >= clock.now - interval '1 hour'
)
SELECT
    (SELECT jsonb_object_agg(status, count) FROM dispatch.queue_depth) AS queue,
    (SELECT extract(epoch FROM (SELECT now FROM clock) - min(created_at)) FROM dispatch.tasks
     WHERE status = 'pending') AS oldest_pending_seconds,
    (SELECT avg(extract(epoch FROM completed_at - created_at)) * 1000 FROM recent
     WHERE status = 'completed') AS avg_completion_ms,
    (SELECT percentile_cont(0.5)
                WITHIN GROUP (ORDER BY extract(epoch FROM assigned_at - created_at))
            * 1000 FROM recent WHERE assigned_at IS NOT NULL) AS wait_ms_p50,
    (SELECT percentile_cont(0.95)
                WITHIN GROUP (ORDER BY extract(epoch FROM assigned_at - created_at))
            * 1000 FROM recent WHERE assigned_at IS NOT NULL) AS wait_ms_p95,
    (SELECT count(*) FROM recent WHERE status = 'completed') AS completed_last_hour,
    (SELECT count(*) FROM recent WHERE status IN ('failed', 'timed_out')) AS failed_last_hour,
    (SELECT count(*) FROM dispatch.tasks WHERE status IN ('failed', 'timed_out')) AS dead_letter
"""


async def stats(conn: Conn, now: datetime | None) -> Stats:
    rows = await _rows(conn, _STATS, {"now": now})
    row = dict(rows[0])
    for key in ("oldest_pending_seconds", "avg_completion_ms", "wait_ms_p50", "wait_ms_p95"):
        if row[key] is not None:
            row[key] = float(row[key])
    queue = row["queue"]
    row["total_pending"] = queue.get("pending", 0)
    row["total_in_progress"] = queue.get("running", 0)
    row["total_completed"] = queue.get("completed", 0)
    row["total_failed"] = queue.get("failed", 0) + queue.get("timed_out", 0)
    return _convert(row, Stats)


# -- the assignment engine ------------------------------------------------------------------------

_ASSIGN_TIMED = """
SELECT * FROM dispatch.task_assign(%(batch)s, coalesce(%(now)s::timestamptz, now()))
"""


async def task_assign_timed(
    conn: Conn, batch: int, now: datetime | None
) -> list[tuple[Assignment, float]]:
    """One assignment batch; each assignment with the seconds its task waited to be assigned
    (since it was created, or became available for a scheduled or retried task)."""
    rows = await _rows(conn, _ASSIGN_TIMED, {"batch": batch, "now": now})
    return [
        (
            _convert({k: r[k] for k in ("task_id", "agent_id", "score", "wake")}, Assignment),
            float(r["waited"]),
        )
        for r in rows
    ]


async def seconds_until_due(conn: Conn) -> float | None:
    """Seconds from the database's now to dispatch.next_due (negative when overdue); None if
    nothing is scheduled."""
    rows = await _rows(
        conn, "SELECT extract(epoch FROM dispatch.next_due(now()) - now())::float8 AS s", ()
    )
    s: float | None = rows[0]["s"]
    return s


async def task_explain(conn: Conn, task_id: uuid.UUID) -> list[Row]:
    return await _rows(conn, "SELECT * FROM dispatch.task_explain(%s)", (task_id,))


async def config_get(conn: Conn) -> Row:
    rows = await _rows(conn, "SELECT * FROM dispatch.config", ())
    return rows[0]


async def agent_sync(
    conn: Conn, entries: Sequence[Mapping[str, object]], now: datetime | None
) -> int:
    rows = await _rows(
        conn,
        "SELECT dispatch.agent_sync(%s, coalesce(%s, now())) AS n",
        (Jsonb(list(entries)), now),
    )
    return int(rows[0]["n"])


async def agent_owners_sync(
    conn: Conn, pairs: Sequence[Mapping[str, str]], source: str, now: datetime | None
) -> int:
    rows = await _rows(
        conn,
        "SELECT dispatch.agent_owners_sync(%s, %s, coalesce(%s, now())) AS n",
        (Jsonb(list(pairs)), source, now),
    )
    return int(rows[0]["n"])


async def agent_mark_stale(conn: Conn, stale_ms: int, now: datetime | None) -> int:
    rows = await _rows(
        conn, "SELECT dispatch.agent_mark_stale(%s, coalesce(%s, now())) AS n", (stale_ms, now)
    )
    return int(rows[0]["n"])


async def advisory_try_lock(conn: Conn, key: int) -> bool:
    """Session-level advisory lock; True when taken (release with advisory_unlock)."""
    rows = await _rows(conn, "SELECT pg_try_advisory_lock(%s) AS ok", (key,))
    return bool(rows[0]["ok"])


async def advisory_unlock(conn: Conn, key: int) -> None:
    await _rows(conn, "SELECT pg_advisory_unlock(%s) AS ok", (key,))


# -- the event relay (sql/005_events.sql) ----------------------------------------------------------


async def event_relay_lock(conn: Conn) -> bool:
    """Try the relay's transaction-level advisory lock; False while another replica relays."""
    rows = await _rows(conn, "SELECT dispatch.event_relay_lock() AS locked", ())
    return bool(rows[0]["locked"])


async def event_relay_batch(conn: Conn, limit: int) -> list[TaskEvent]:
    """The oldest unpublished events, locked FOR UPDATE SKIP LOCKED until the transaction ends."""
    rows = await _rows(conn, "SELECT * FROM dispatch.event_relay_batch(%s)", (limit,))
    return [_convert(r, TaskEvent) for r in rows]


async def tasks_by_id(conn: Conn, task_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Task]:
    rows = await _rows(
        conn, "SELECT * FROM dispatch.tasks WHERE task_id = ANY (%s)", (list(task_ids),)
    )
    return {r["task_id"]: _convert(r, Task) for r in rows}


async def event_mark_published(conn: Conn, ids: Sequence[int], now: datetime | None) -> int:
    rows = await _rows(
        conn,
        "SELECT dispatch.event_mark_published(%s, coalesce(%s, now())) AS n",
        (list(ids), now),
    )
    return int(rows[0]["n"])


# -- scrape-time gauges (GET /metrics) ------------------------------------------------------------

_GAUGES = """
SELECT
    (SELECT coalesce(jsonb_object_agg(status, count), '{}') FROM dispatch.queue_depth)
        AS queue_depth,
    (SELECT extract(epoch FROM now() - min(created_at))::float8 FROM dispatch.tasks
     WHERE status = 'pending') AS oldest_pending_seconds,
    (SELECT coalesce(jsonb_object_agg(status, n), '{}')
     FROM (SELECT s.status, count(a.agent_id) AS n
           FROM unnest(enum_range(NULL::dispatch.agent_status)) AS s (status)
           LEFT JOIN dispatch.agents a ON a.status = s.status
           GROUP BY s.status) per_status) AS agents,
    (SELECT count(*) FROM dispatch.task_events WHERE published_at IS NULL) AS event_log_unpublished
"""


async def metrics_gauges(conn: Conn) -> dict[str, Any]:
    """The queue gauges of SPEC section 9, read at scrape time: queue_depth {status: n},
    oldest_pending_seconds, agents {status: n}, event_log_unpublished."""
    rows = await _rows(conn, _GAUGES, ())
    return dict(rows[0])
