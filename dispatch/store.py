"""Store(pool): one method per SQL call, rows → structs. Each method takes an optional connection
(`conn=`) so a caller can put several calls in one transaction; without one it borrows a pooled
connection. No decisions are made here; `now` parameters are an injected clock for tests."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import msgspec
import psycopg
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from dispatch import db
from dispatch.errors import NotFound
from dispatch.models import (
    Agent,
    AgentStatus,
    Assignment,
    ConcurrencyLimit,
    Cursor,
    Expiry,
    NewTask,
    RateLimit,
    ReportOutcome,
    Stats,
    Task,
    TaskEvent,
    TaskFilter,
    TenantWeight,
)
from dispatch.settings import AssignmentSettings

Conn = AsyncConnection[Any]
Row = Mapping[str, Any]
Params = Sequence[object] | Mapping[str, object]
S = TypeVar("S", bound=msgspec.Struct)


def _convert(row: Row, kind: type[S]) -> S:
    return msgspec.convert(row, kind, from_attributes=False)


def _report_task_id(report: Mapping[str, object]) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(report.get("task_id")))
    except ValueError:
        return None


def _jsonb(value: object) -> Jsonb | None:
    return None if value is None else Jsonb(value)


_INSERT_TASK = """
INSERT INTO dispatch.tasks (title, description, requester, owner, required_capabilities, priority,
                            timeout_seconds, heartbeat_seconds, max_retries, metadata,
                            parent_task_id, available_at, source, idempotency_key,
                            concurrency_key, rate_key, cost)
VALUES (%(title)s, %(description)s, %(requester)s, %(owner)s, %(required_capabilities)s,
        %(priority)s, %(timeout_seconds)s, %(heartbeat_seconds)s, %(max_retries)s, %(metadata)s,
        %(parent_task_id)s, %(available_at)s, %(source)s, %(idempotency_key)s,
        %(concurrency_key)s, %(rate_key)s, %(cost)s)
ON CONFLICT (requester, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING *
"""

_BY_IDEMPOTENCY_KEY = """
SELECT * FROM dispatch.tasks WHERE requester = %s AND idempotency_key = %s
"""

_LIST_TASKS = """
SELECT * FROM dispatch.tasks
WHERE (%(statuses)s::dispatch.task_status[] IS NULL OR status = ANY (%(statuses)s))
  AND (%(requester)s::text IS NULL OR requester = %(requester)s)
  AND (%(owner)s::text IS NULL OR owner = %(owner)s)
  AND (%(assignee)s::text IS NULL OR assigned_agent = %(assignee)s)
  AND (%(capability)s::text IS NULL OR required_capabilities @> ARRAY[%(capability)s::text])
  AND (%(source)s::text IS NULL OR source = %(source)s)
  AND (%(parent)s::uuid IS NULL OR parent_task_id = %(parent)s)
  AND (%(viewer)s::text IS NULL OR requester = %(viewer)s OR owner = %(viewer)s
       OR assigned_agent = %(viewer)s OR %(viewer)s = ANY (previous_agents))
  AND (%(c_priority)s::integer IS NULL
       OR priority < %(c_priority)s
       OR priority = %(c_priority)s AND (created_at, task_id) > (%(c_created)s, %(c_id)s::uuid))
ORDER BY priority DESC, created_at, task_id
LIMIT %(limit)s
"""

_AGENT_COLUMNS = """
a.agent_id, a.capabilities, a.owner, a.status, a.policy,
coalesce(a.max_concurrent, c.max_concurrent_per_agent) AS max_concurrent,
a.active_count AS active_tasks, a.drained, a.source, a.last_assigned_at, a.last_seen_at,
a.updated_at
"""

_APPLY_CONFIG = """
UPDATE dispatch.config SET
    default_timeout_seconds = greatest(1, %(timeout)s / 1000),
    max_concurrent_per_agent = %(max_concurrent)s,
    owner_filter_enabled = %(owner_filter)s,
    retry_backoff_ms = %(backoff)s,
    retry_backoff_max_ms = %(backoff_max)s,
    wake_timeout_ms = %(wake)s,
    unmatched_repeat_ms = %(unmatched)s,
    tick_interval_ms = %(tick)s,
    aging_ms = %(aging)s,
    updated_at = now()
WHERE (default_timeout_seconds, max_concurrent_per_agent, owner_filter_enabled, retry_backoff_ms,
       retry_backoff_max_ms, wake_timeout_ms, unmatched_repeat_ms, tick_interval_ms, aging_ms)
   IS DISTINCT FROM (greatest(1, %(timeout)s / 1000), %(max_concurrent)s, %(owner_filter)s,
                     %(backoff)s, %(backoff_max)s, %(wake)s, %(unmatched)s, %(tick)s, %(aging)s)
"""

# `now` is written out at each use rather than joined from a clock CTE: a join leaves the planner
# guessing a third of the history for "the last hour" (a sequential scan of it, and JIT where JIT
# is on); written out, the last hour is read through tasks_terminal_completed_idx and the dead
# letters through tasks_dead_letter_idx. Only the counts by status read every row.
_STATS = """
WITH recent AS (
    SELECT status, created_at, assigned_at, completed_at FROM dispatch.tasks
    WHERE status IN ('completed', 'failed', 'timed_out', 'cancelled')
      AND completed_at >= coalesce(%(now)s::timestamptz, now()) - interval '1 hour'
)
SELECT
    (SELECT jsonb_object_agg(status, count) FROM dispatch.queue_depth) AS queue,
    (SELECT extract(epoch FROM coalesce(%(now)s::timestamptz, now()) - min(created_at))
     FROM dispatch.tasks WHERE status = 'pending') AS oldest_pending_seconds,
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

# The dashboard's charts: per minute of the last hour, the tasks that ended (completed, or
# failed for good) and the create-to-assign wait of the tasks assigned. Only terminal rows of the
# last hour (tasks_terminal_completed_idx) and the active rows (tasks_active_deadline_idx) are read,
# however deep the queue or long the history. `since` is written out at each use, not joined from
# a clock CTE, so that the planner estimates the last hour's rows from the column's statistics (a
# join's guess, a third of the history, plans a sort of them, and JIT where JIT is on).
_UI_SERIES = """
WITH ended AS (
    SELECT status, created_at, assigned_at, completed_at FROM dispatch.tasks
    WHERE status IN ('completed', 'failed', 'timed_out', 'cancelled')
      AND completed_at >= {since}
),
assigned AS (
    SELECT created_at, assigned_at FROM ended WHERE assigned_at >= {since}
    UNION ALL
    SELECT created_at, assigned_at FROM dispatch.tasks
    WHERE status IN ('assigned', 'running') AND assigned_at >= {since}
)
SELECT g.minute,
       coalesce(d.completed, 0) AS completed,
       coalesce(d.failed, 0) AS failed,
       w.wait_ms_p50,
       w.wait_ms_p95
FROM generate_series({since}, {since} + interval '59 minutes', interval '1 minute')
     AS g (minute)
LEFT JOIN (
    SELECT date_trunc('minute', completed_at) AS minute,
           count(*) FILTER (WHERE status = 'completed') AS completed,
           count(*) FILTER (WHERE status IN ('failed', 'timed_out')) AS failed
    FROM ended GROUP BY 1
) d USING (minute)
LEFT JOIN (
    SELECT date_trunc('minute', assigned_at) AS minute,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY waited) * 1000 AS wait_ms_p50,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY waited) * 1000 AS wait_ms_p95
    FROM (SELECT assigned_at, extract(epoch FROM assigned_at - created_at) AS waited
          FROM assigned) a
    GROUP BY 1
) w USING (minute)
ORDER BY g.minute
""".format(
    since="(date_trunc('minute', coalesce(%(now)s::timestamptz, now())) - interval '59 minutes')"
)

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
    (SELECT count(*) FROM dispatch.task_events WHERE published_at IS NULL) AS event_log_unpublished,
    (SELECT coalesce(jsonb_agg(jsonb_build_object('rule', h.rule, 'key', h.key, 'tasks', h.tasks)),
                     '[]') FROM dispatch.flow_held() h) AS flow_held,
    (SELECT coalesce(jsonb_object_agg(r.key, r.tokens), '{}') FROM dispatch.rate_limit_list() r)
        AS rate_tokens,
    (SELECT coalesce(jsonb_object_agg(l.key, jsonb_build_array(l.active_tasks, l.max_active)),
                     '{}') FROM dispatch.concurrency_limit_list() l) AS concurrency_active
"""


class Store:
    """The pool and every SQL call Dispatch makes."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self.pool = pool

    # -- connections -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _borrow(self, conn: Conn | None) -> AsyncIterator[Conn]:
        if conn is not None:
            yield conn
            return
        async with db.connection(self.pool) as pooled:
            yield pooled

    @contextlib.asynccontextmanager
    async def _borrow_transaction(self, conn: Conn | None) -> AsyncIterator[Conn]:
        """`conn` as it is, or a pooled connection inside one transaction."""
        if conn is not None:
            yield conn
            return
        async with self.transaction() as pooled:
            yield pooled

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        """A pooled connection inside one transaction; pass it as `conn=` to the methods."""
        async with db.connection(self.pool) as conn, conn.transaction():
            yield conn

    @contextlib.asynccontextmanager
    async def maintenance(self, statement_timeout_ms: int) -> AsyncIterator[Conn]:
        """A transaction whose statements may run up to statement_timeout_ms instead of the
        pool's bound (database.statement_timeout_ms): for background maintenance whose batches
        may legitimately take longer than a request should. Lock waits keep the pool's bound."""
        async with self.transaction() as conn:
            await self._rows(
                "SELECT set_config('statement_timeout', %s, true)",
                (str(statement_timeout_ms),),
                conn,
            )
            yield conn

    async def _rows(self, query: str, params: Params, conn: Conn | None) -> list[Row]:
        async with self._borrow(conn) as c:
            try:
                cur = await c.execute(query, params)  # type: ignore[arg-type]
                return await cur.fetchall()
            except psycopg.Error as exc:
                raise db.translate(exc) from exc

    async def _task(self, query: str, params: Params, conn: Conn | None) -> Task:
        rows = await self._rows(query, params, conn)
        return _convert(rows[0], Task)

    async def _count(self, query: str, params: Params, conn: Conn | None) -> int:
        rows = await self._rows(query, params, conn)
        return int(rows[0]["n"])

    # -- tasks -----------------------------------------------------------------------------------

    async def task_create(
        self,
        new: NewTask,
        *,
        requester: str,
        idempotency_key: str | None = None,
        conn: Conn | None = None,
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
            "concurrency_key": new.concurrency_key,
            "rate_key": new.rate_key,
            "cost": new.cost,
        }
        async with self._borrow(conn) as c:
            rows = await self._rows(_INSERT_TASK, params, c)
            if rows:
                return _convert(rows[0], Task), True
            rows = await self._rows(_BY_IDEMPOTENCY_KEY, (requester, idempotency_key), c)
        return _convert(rows[0], Task), False

    async def task_get(self, task_id: uuid.UUID, *, conn: Conn | None = None) -> Task:
        """The task; NotFound when there is none."""
        rows = await self._rows(
            "SELECT * FROM dispatch.tasks WHERE task_id = %s", (task_id,), conn
        )
        if not rows:
            raise NotFound(f"task {task_id} not found")
        return _convert(rows[0], Task)

    async def tasks_by_id(
        self, task_ids: Sequence[uuid.UUID], *, conn: Conn | None = None
    ) -> dict[uuid.UUID, Task]:
        rows = await self._rows(
            "SELECT * FROM dispatch.tasks WHERE task_id = ANY (%s)", (list(task_ids),), conn
        )
        return {r["task_id"]: _convert(r, Task) for r in rows}

    async def task_list(
        self,
        filters: TaskFilter,
        *,
        limit: int = 50,
        after: Cursor | None = None,
        conn: Conn | None = None,
    ) -> list[Task]:
        params = {
            "statuses": [str(s) for s in filters.statuses] if filters.statuses else None,
            "requester": filters.requester,
            "owner": filters.owner,
            "assignee": filters.assignee,
            "capability": filters.capability.strip().lower() if filters.capability else None,
            "source": filters.source,
            "parent": filters.parent_task_id,
            "viewer": filters.visible_to,
            "c_priority": after.priority if after else None,
            "c_created": after.created_at if after else None,
            "c_id": after.task_id if after else None,
            "limit": limit,
        }
        return [_convert(r, Task) for r in await self._rows(_LIST_TASKS, params, conn)]

    async def task_events(
        self, task_id: uuid.UUID, *, conn: Conn | None = None
    ) -> list[TaskEvent]:
        """The task's history, oldest first; NotFound when there is no such task."""
        async with self._borrow(conn) as c:
            rows = await self._rows(
                "SELECT * FROM dispatch.task_events WHERE task_id = %s ORDER BY id", (task_id,), c
            )
            if not rows:
                await self.task_get(task_id, conn=c)
        return [_convert(r, TaskEvent) for r in rows]

    async def task_claim(
        self,
        agent_id: str,
        capabilities: Sequence[str] | None = None,
        *,
        max_tasks: int = 1,
        start: bool = False,
        now: datetime | None = None,
        conn: Conn | None = None,
    ) -> list[Task]:
        """Up to max_tasks of the best tasks this agent may take (started with `start`)."""
        rows = await self._rows(
            "SELECT * FROM dispatch.task_claim(%s, %s, coalesce(%s, now()), %s, %s)",
            (agent_id, list(capabilities) if capabilities is not None else None, now, max_tasks,
             start),
            conn,
        )
        return [_convert(r, Task) for r in rows]

    async def task_report_batch(
        self,
        agent_id: str,
        reports: Sequence[Mapping[str, object]],
        *,
        admin: bool = False,
        now: datetime | None = None,
        conn: Conn | None = None,
    ) -> list[ReportOutcome]:
        """Apply several reports of one agent in one transaction, each fenced on its own."""
        rows = await self._rows(
            "SELECT * FROM dispatch.task_report_batch(%s, %s, %s, coalesce(%s, now()))"
            " ORDER BY ord",
            (agent_id, Jsonb(list(reports)), admin, now),
            conn,
        )
        return [
            ReportOutcome(
                task_id=_report_task_id(reports[r["ord"] - 1]),
                status=r["status"],
                task=msgspec.convert(r["task"], Task, strict=False) if r["task"] else None,
                error=r["error"],
                field=r["field"],
            )
            for r in rows
        ]

    async def task_assign(
        self, batch: int, *, now: datetime | None = None, conn: Conn | None = None
    ) -> list[Assignment]:
        """One assignment batch (SKIP LOCKED); each with the seconds its task waited."""
        rows = await self._rows(
            "SELECT * FROM dispatch.task_assign(%s, coalesce(%s::timestamptz, now()))",
            (batch, now),
            conn,
        )
        return [_convert(r, Assignment) for r in rows]

    async def task_start(
        self,
        task_id: uuid.UUID,
        agent_id: str,
        *,
        lease: int | None = None,
        now: datetime | None = None,
        conn: Conn | None = None,
    ) -> Task:
        return await self._task(
            "SELECT * FROM dispatch.task_start(%s, %s, coalesce(%s, now()), %s)",
            (task_id, agent_id, now, lease),
            conn,
        )

    async def task_progress(
        self,
        task_id: uuid.UUID,
        agent_id: str,
        *,
        percent: float | None = None,
        message: str | None = None,
        data: object = None,
        lease: int | None = None,
        now: datetime | None = None,
        conn: Conn | None = None,
    ) -> Task:
        return await self._task(
            "SELECT * FROM dispatch.task_progress("
            "%s, %s, %s::real, %s, %s, coalesce(%s, now()), %s)",
            (task_id, agent_id, percent, message, _jsonb(data), now, lease),
            conn,
        )

    async def task_complete(
        self,
        task_id: uuid.UUID,
        actor: str,
        result: object = None,
        *,
        admin: bool = False,
        lease: int | None = None,
        now: datetime | None = None,
        conn: Conn | None = None,
    ) -> Task:
        return await self._task(
            "SELECT * FROM dispatch.task_complete(%s, %s, %s, %s, coalesce(%s, now()), %s)",
            (task_id, actor, _jsonb(result), admin, now, lease),
            conn,
        )

    async def task_fail(
        self,
        task_id: uuid.UUID,
        agent_id: str,
        error: str | None = None,
        *,
        retry_eligible: bool = True,
        lease: int | None = None,
        now: datetime | None = None,
        conn: Conn | None = None,
    ) -> Task:
        return await self._task(
            "SELECT * FROM dispatch.task_fail(%s, %s, %s, %s, coalesce(%s, now()), %s)",
            (task_id, agent_id, error, retry_eligible, now, lease),
            conn,
        )

    async def task_cancel(
        self,
        task_id: uuid.UUID,
        actor: str,
        reason: str | None = None,
        *,
        admin: bool = False,
        now: datetime | None = None,
        conn: Conn | None = None,
    ) -> Task:
        return await self._task(
            "SELECT * FROM dispatch.task_cancel(%s, %s, %s, %s, coalesce(%s, now()))",
            (task_id, actor, reason, admin, now),
            conn,
        )

    async def task_update(
        self,
        task_id: uuid.UUID,
        actor: str,
        *,
        metadata_patch: dict[str, object] | None = None,
        priority: int | None = None,
        admin: bool = False,
        now: datetime | None = None,
        conn: Conn | None = None,
    ) -> Task:
        return await self._task(
            "SELECT * FROM dispatch.task_update(%s, %s, %s, %s, %s, coalesce(%s, now()))",
            (task_id, actor, _jsonb(metadata_patch), priority, admin, now),
            conn,
        )

    async def task_requeue(
        self,
        task_id: uuid.UUID,
        actor: str,
        *,
        now: datetime | None = None,
        conn: Conn | None = None,
    ) -> Task:
        return await self._task(
            "SELECT * FROM dispatch.task_requeue(%s, %s, coalesce(%s, now()))",
            (task_id, actor, now),
            conn,
        )

    async def task_expire(
        self, *, now: datetime | None = None, limit: int = 100, conn: Conn | None = None
    ) -> list[Expiry]:
        rows = await self._rows(
            "SELECT * FROM dispatch.task_expire(coalesce(%s, now()), %s)", (now, limit), conn
        )
        return [_convert(r, Expiry) for r in rows]

    async def task_report_unmatched(
        self, *, now: datetime | None = None, limit: int = 100, conn: Conn | None = None
    ) -> int:
        """Report pending tasks no agent can take; returns how many were reported."""
        return await self._count(
            "SELECT dispatch.task_report_unmatched(coalesce(%s, now()), %s) AS n",
            (now, limit),
            conn,
        )

    async def seconds_until_due(
        self, *, now: datetime | None = None, conn: Conn | None = None
    ) -> float | None:
        """Seconds from now to dispatch.next_due, the next deadline or scheduled task (negative
        when overdue); None if nothing is due."""
        rows = await self._rows(
            "SELECT extract(epoch FROM dispatch.next_due(t.now) - t.now)::float8 AS s"
            " FROM (SELECT coalesce(%s::timestamptz, now()) AS now) t",
            (now,),
            conn,
        )
        s: float | None = rows[0]["s"]
        return s

    async def task_prune(
        self, before: datetime, limit: int = 1000, *, conn: Conn | None = None
    ) -> int:
        return await self._count(
            "SELECT dispatch.task_prune(%s, %s) AS n", (before, limit), conn
        )

    async def task_explain(self, task_id: uuid.UUID, *, conn: Conn | None = None) -> list[Row]:
        return await self._rows("SELECT * FROM dispatch.task_explain(%s)", (task_id,), conn)

    async def task_hold(
        self, task_id: uuid.UUID, *, now: datetime | None = None, conn: Conn | None = None
    ) -> Row:
        """The task's tenant, effective priority and the flow rules holding it back now."""
        rows = await self._rows(
            "SELECT * FROM dispatch.task_hold(%s, coalesce(%s::timestamptz, now()))",
            (task_id, now), conn,
        )
        return rows[0]

    # -- flow control ----------------------------------------------------------------------------

    async def concurrency_limit_set(
        self, key: str, max_active: int, *, conn: Conn | None = None
    ) -> ConcurrencyLimit:
        async with self._borrow_transaction(conn) as c:  # a delete cannot come in between
            await self._rows("SELECT dispatch.concurrency_limit_set(%s, %s)", (key, max_active), c)
            return (await self.concurrency_limits(key, conn=c))[0]

    async def concurrency_limits(
        self, key: str | None = None, *, conn: Conn | None = None
    ) -> list[ConcurrencyLimit]:
        """Every concurrency limit, or the one of `key`."""
        rows = await self._rows(
            "SELECT * FROM dispatch.concurrency_limit_list()"
            " WHERE %(key)s::text IS NULL OR key = %(key)s", {"key": key}, conn,
        )
        return [_convert(r, ConcurrencyLimit) for r in rows]

    async def concurrency_limit_delete(self, key: str, *, conn: Conn | None = None) -> bool:
        rows = await self._rows(
            "SELECT dispatch.concurrency_limit_delete(%s) AS gone", (key,), conn
        )
        return bool(rows[0]["gone"])

    async def rate_limit_set(
        self, key: str, capacity: float, refill_per_second: float, *, conn: Conn | None = None
    ) -> RateLimit:
        async with self._borrow_transaction(conn) as c:  # a delete cannot come in between
            await self._rows("SELECT dispatch.rate_limit_set(%s, %s, %s)",
                             (key, capacity, refill_per_second), c)
            return (await self.rate_limits(key, conn=c))[0]

    async def rate_limits(
        self, key: str | None = None, *, now: datetime | None = None, conn: Conn | None = None
    ) -> list[RateLimit]:
        """Every bucket with the tokens it holds now, or the one of `key`."""
        rows = await self._rows(
            "SELECT * FROM dispatch.rate_limit_list(coalesce(%(now)s::timestamptz, now()))"
            " WHERE %(key)s::text IS NULL OR key = %(key)s", {"key": key, "now": now}, conn,
        )
        return [_convert(r, RateLimit) for r in rows]

    async def rate_limit_delete(self, key: str, *, conn: Conn | None = None) -> bool:
        rows = await self._rows("SELECT dispatch.rate_limit_delete(%s) AS gone", (key,), conn)
        return bool(rows[0]["gone"])

    async def tenant_weight_set(
        self, tenant: str, weight: float, *, conn: Conn | None = None
    ) -> TenantWeight:
        rows = await self._rows(
            "SELECT tenant, weight FROM dispatch.tenant_weight_set(%s, %s)", (tenant, weight),
            conn,
        )
        return _convert(rows[0], TenantWeight)

    async def tenant_weight(self, tenant: str, *, conn: Conn | None = None) -> TenantWeight:
        """The tenant's weight; weight 1 and `default` when none was set."""
        rows = await self._rows(
            "SELECT %(t)s AS tenant, coalesce(w.weight, 1) AS weight, w.tenant IS NULL AS default"
            " FROM (SELECT 1) one LEFT JOIN dispatch.tenant_weights w ON w.tenant = %(t)s",
            {"t": tenant}, conn,
        )
        return _convert(rows[0], TenantWeight)

    async def tenant_weight_delete(self, tenant: str, *, conn: Conn | None = None) -> bool:
        rows = await self._rows(
            "SELECT dispatch.tenant_weight_delete(%s) AS gone", (tenant,), conn
        )
        return bool(rows[0]["gone"])

    # -- agents ----------------------------------------------------------------------------------

    async def _agent(self, source: str, params: Sequence[object], conn: Conn | None) -> Agent:
        query = f"SELECT {_AGENT_COLUMNS} FROM {source} a CROSS JOIN dispatch.config c"
        rows = await self._rows(query, params, conn)
        return _convert(rows[0], Agent)

    async def agent_upsert(
        self,
        agent_id: str,
        *,
        capabilities: Sequence[str] | None = None,
        owner: str | None = None,
        max_concurrent: int | None = None,
        status: AgentStatus | None = None,
        policy: str | None = None,
        source: str = "registry",
        now: datetime | None = None,
        conn: Conn | None = None,
    ) -> Agent:
        """Register an agent or update it; unset fields keep their current value."""
        return await self._agent(
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
            conn,
        )

    async def agent_heartbeat(
        self,
        agent_id: str,
        status: AgentStatus | None = None,
        *,
        now: datetime | None = None,
        conn: Conn | None = None,
    ) -> Agent:
        return await self._agent(
            "dispatch.agent_heartbeat(%s, %s, coalesce(%s, now()))",
            (agent_id, str(status) if status else None, now),
            conn,
        )

    async def agent_drain(
        self,
        agent_id: str,
        drained: bool = True,
        *,
        now: datetime | None = None,
        conn: Conn | None = None,
    ) -> Agent:
        return await self._agent(
            "dispatch.agent_drain(%s, %s, coalesce(%s, now()))", (agent_id, drained, now), conn
        )

    async def agent_stop(
        self, agent_id: str, *, now: datetime | None = None, conn: Conn | None = None
    ) -> int:
        """The agent stopped: its active tasks go back to pending. Returns how many."""
        return await self._count(
            "SELECT dispatch.agent_stop(%s, coalesce(%s, now())) AS n", (agent_id, now), conn
        )

    async def agent_get(self, agent_id: str, *, conn: Conn | None = None) -> Agent:
        """The agent; NotFound when there is none."""
        rows = await self._rows(
            f"SELECT {_AGENT_COLUMNS} FROM dispatch.agents a CROSS JOIN dispatch.config c"
            " WHERE a.agent_id = %s",
            (agent_id,),
            conn,
        )
        if not rows:
            raise NotFound(f"agent {agent_id} not found")
        return _convert(rows[0], Agent)

    async def agent_list(self, *, conn: Conn | None = None) -> list[Agent]:
        rows = await self._rows(
            f"SELECT {_AGENT_COLUMNS} FROM dispatch.agents a CROSS JOIN dispatch.config c"
            " ORDER BY a.agent_id",
            (),
            conn,
        )
        return [_convert(r, Agent) for r in rows]

    async def agent_sync(
        self,
        entries: Sequence[Mapping[str, object]],
        *,
        now: datetime | None = None,
        conn: Conn | None = None,
    ) -> int:
        return await self._count(
            "SELECT dispatch.agent_sync(%s, coalesce(%s, now())) AS n",
            (Jsonb(list(entries)), now),
            conn,
        )

    async def agent_owners_sync(
        self,
        pairs: Sequence[Mapping[str, str]],
        source: str,
        *,
        now: datetime | None = None,
        conn: Conn | None = None,
    ) -> int:
        return await self._count(
            "SELECT dispatch.agent_owners_sync(%s, %s, coalesce(%s, now())) AS n",
            (Jsonb(list(pairs)), source, now),
            conn,
        )

    async def agent_mark_stale(
        self, stale_ms: int, *, now: datetime | None = None, conn: Conn | None = None
    ) -> int:
        """Agents not refreshed for stale_ms become unknown; returns how many."""
        return await self._count(
            "SELECT dispatch.agent_mark_stale(%s, coalesce(%s, now())) AS n", (stale_ms, now), conn
        )

    # -- agent tokens ----------------------------------------------------------------------------

    async def agent_token_issue(self, agent_id: str, *, conn: Conn | None = None) -> str:
        """A new token for agent_id; only its hash is stored, so this is the one time it is seen."""
        rows = await self._rows(
            "SELECT dispatch.agent_token_issue(%s) AS token", (agent_id,), conn
        )
        token: str = rows[0]["token"]
        return token

    async def agent_token_agent(self, token: str, *, conn: Conn | None = None) -> str | None:
        """The identity the token is good for; None when it is unknown or revoked."""
        rows = await self._rows("SELECT dispatch.agent_token_agent(%s) AS agent_id", (token,), conn)
        agent_id: str | None = rows[0]["agent_id"]
        return agent_id

    async def agent_token_revoke(self, agent_id: str, *, conn: Conn | None = None) -> int:
        """Revoke every token of agent_id; returns how many there were."""
        return await self._count(
            "SELECT dispatch.agent_token_revoke(%s) AS n", (agent_id,), conn
        )

    # -- configuration and statistics ------------------------------------------------------------

    async def config_get(self, *, conn: Conn | None = None) -> Row:
        rows = await self._rows("SELECT * FROM dispatch.config", (), conn)
        return rows[0]

    async def config_apply(self, a: AssignmentSettings, *, conn: Conn | None = None) -> None:
        """Write the assignment settings the SQL functions read (a no-op when unchanged)."""
        params = {
            "timeout": a.default_timeout_ms,
            "max_concurrent": a.max_concurrent_per_agent,
            "owner_filter": a.owner_filter_enabled,
            "backoff": a.retry_backoff_ms,
            "backoff_max": a.retry_backoff_max_ms,
            "wake": a.wake_timeout_ms,
            "unmatched": a.unmatched_repeat_ms,
            "tick": a.tick_interval_ms,
            "aging": a.aging_ms,
        }
        async with self._borrow(conn) as c:
            try:
                await c.execute(_APPLY_CONFIG, params)
            except psycopg.Error as exc:
                raise db.translate(exc) from exc

    async def config_relay_running(self, *, conn: Conn | None = None) -> None:
        """A relay runs: from now on new event rows NOTIFY dispatch_events (it stays on; a DBA
        can turn it off when no replica relays any more)."""
        await self._rows(
            "UPDATE dispatch.config SET events_notify = true WHERE NOT events_notify"
            " RETURNING 1", (), conn,
        )

    async def stats(self, *, now: datetime | None = None, conn: Conn | None = None) -> Stats:
        rows = await self._rows(_STATS, {"now": now}, conn)
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

    async def ui_series(
        self, *, now: datetime | None = None, conn: Conn | None = None
    ) -> list[Row]:
        """Per minute of the last hour (60 rows, oldest first): completed, failed, wait_ms_p50,
        wait_ms_p95 (None in a minute without assignments)."""
        rows = await self._rows(_UI_SERIES, {"now": now}, conn)
        return [
            {**r, "wait_ms_p50": None if r["wait_ms_p50"] is None else float(r["wait_ms_p50"]),
             "wait_ms_p95": None if r["wait_ms_p95"] is None else float(r["wait_ms_p95"])}
            for r in rows
        ]

    async def ui_notify_keep(self, seconds: int, *, conn: Conn | None = None) -> None:
        """Dashboards are open here: new event rows NOTIFY dispatch_events for `seconds` more.
        Written only once the lease is half gone, so open dashboards cost one small update per
        half lease, not one per refresh."""
        await self._rows(
            "UPDATE dispatch.config SET ui_notify_until = now() + make_interval(secs => %(s)s)"
            " WHERE ui_notify_until IS NULL"
            "    OR ui_notify_until < now() + make_interval(secs => %(s)s / 2.0)"
            " RETURNING 1",
            {"s": seconds},
            conn,
        )

    async def metrics_gauges(self, *, conn: Conn | None = None) -> dict[str, Any]:
        """The queue gauges read at scrape time: queue_depth {status: n}, oldest_pending_seconds,
        agents {status: n}, event_log_unpublished; flow control's flow_held [{rule, key, tasks}],
        rate_tokens {key: tokens}, concurrency_active {key: [active, max_active]}."""
        rows = await self._rows(_GAUGES, (), conn)
        return dict(rows[0])

    # -- locks -----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def exclusive(self, key: int) -> AsyncIterator[bool]:
        """Hold the session advisory lock `key` for the block if no other replica holds it;
        yields whether it was taken (the block should do nothing when it was not)."""
        async with db.connection(self.pool) as conn:
            rows = await self._rows("SELECT pg_try_advisory_lock(%s) AS ok", (key,), conn)
            taken = bool(rows[0]["ok"])
            try:
                yield taken
            finally:
                if taken:
                    await self._rows("SELECT pg_advisory_unlock(%s) AS ok", (key,), conn)

    # -- the event relay -------------------------------------------------------------------------

    async def event_relay_lock(self, *, conn: Conn) -> bool:
        """Try the relay's transaction-level advisory lock; False while another replica relays."""
        rows = await self._rows("SELECT dispatch.event_relay_lock() AS locked", (), conn)
        return bool(rows[0]["locked"])

    async def event_relay_batch(self, limit: int, *, conn: Conn) -> list[TaskEvent]:
        """The oldest unpublished events, locked FOR UPDATE SKIP LOCKED until the transaction
        ends."""
        rows = await self._rows("SELECT * FROM dispatch.event_relay_batch(%s)", (limit,), conn)
        return [_convert(r, TaskEvent) for r in rows]

    async def event_set_aside(
        self, ids: Sequence[int], error: str, *, conn: Conn | None = None
    ) -> int:
        return await self._count(
            "SELECT dispatch.event_set_aside(%s, %s) AS n", (list(ids), error), conn
        )

    async def event_mark_published(
        self, ids: Sequence[int], *, now: datetime | None = None, conn: Conn | None = None
    ) -> int:
        return await self._count(
            "SELECT dispatch.event_mark_published(%s, coalesce(%s, now())) AS n",
            (list(ids), now),
            conn,
        )
