"""Read-only views of the whole queue: the stats endpoint, the dashboard's charts, the metrics
gauges read at scrape time."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from dispatch.models import Stats
from dispatch.store.base import Conn, Queries, Row, convert

# The pending queue by capability, and by tenant while flow control is on (13_dba.sql), each the
# TOP_KEYS largest and 'other'.
TOP_KEYS = 20
_NOW = "coalesce(%(now)s::timestamptz, now())"
_BY = f"""
    (SELECT coalesce(jsonb_agg(to_jsonb(p)), '[]')
     FROM dispatch.pending_by('capability', {TOP_KEYS}, {_NOW}) p) AS by_capability,
    CASE WHEN dispatch.flow_control_on() THEN
        (SELECT coalesce(jsonb_agg(to_jsonb(p) - 'agents'), '[]')
         FROM dispatch.pending_by('tenant', {TOP_KEYS}, {_NOW}) p)
    END AS by_tenant
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
    (SELECT count(*) FROM dispatch.tasks WHERE status IN ('failed', 'timed_out')) AS dead_letter,
""" + _BY

# The dashboard's charts: per minute of the last hour, the tasks that ended (completed, or failed
# for good) and the create-to-assign wait of the tasks assigned. Only terminal rows of the last hour
# (tasks_terminal_completed_idx) and the active and suspended rows (tasks_active_deadline_idx) are
# read, however deep the queue or long the history. `since` is written out at each use, not joined
# from a clock CTE, so that the planner estimates the last hour's rows from the column's statistics
# (a join's guess, a third of the history, plans a sort of them, and JIT where JIT is on).
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
    WHERE status IN ('assigned', 'running', 'suspended') AND assigned_at >= {since}
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
                     '{}') FROM dispatch.concurrency_limit_list() l) AS concurrency_active,
""" + _BY


# The dashboard's flow-control panel: concurrency keys fullest first and rate buckets emptiest
# first (FLOW_KEYS of each), with the tasks each holds back (dispatch.flow_held, as the metrics
# read it). While flow control is off (no rule) only that check runs: the one-time filter keeps
# flow_held from being read.
FLOW_KEYS = 20
_FLOW = f"""
WITH flow AS (SELECT dispatch.flow_control_on() AS enabled),
held AS MATERIALIZED (SELECT * FROM dispatch.flow_held() WHERE (SELECT enabled FROM flow))
SELECT (SELECT enabled FROM flow) AS enabled,
    (SELECT coalesce(jsonb_agg(c), '[]') FROM (
        SELECT l.key, l.active_tasks, l.max_active, coalesce(h.tasks, 0) AS held
        FROM dispatch.concurrency_limit_list() l
        LEFT JOIN held h ON h.rule = 'concurrency' AND h.key = l.key
        WHERE (SELECT enabled FROM flow)
        ORDER BY l.active_tasks::float8 / greatest(l.max_active, 1) DESC, l.key
        LIMIT {FLOW_KEYS}) c) AS concurrency,
    (SELECT coalesce(jsonb_agg(r), '[]') FROM (
        SELECT l.key, l.capacity, l.refill_per_second, l.tokens, coalesce(h.tasks, 0) AS held
        FROM dispatch.rate_limit_list() l
        LEFT JOIN held h ON h.rule = 'rate' AND h.key = l.key
        WHERE (SELECT enabled FROM flow)
        ORDER BY l.tokens / greatest(l.capacity, 1), l.key
        LIMIT {FLOW_KEYS}) r) AS rate,
    (SELECT coalesce(sum(tasks), 0) FROM held WHERE rule = 'fair_share') AS fair_share_held
"""

# An agent's page: the tasks it ended last (newest first), and over the last hour how many it
# completed and failed (for good, or timed out) and its mean run time. Read through
# tasks_terminal_completed_idx by time, filtered by agent.
_AGENT_RECENT = """
SELECT task_id, title, status, error, started_at, completed_at
FROM dispatch.tasks
WHERE assigned_agent = %(agent)s AND status IN ('completed', 'failed', 'timed_out', 'cancelled')
ORDER BY completed_at DESC
LIMIT %(limit)s
"""
_AGENT_HOUR = """
SELECT count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status IN ('failed', 'timed_out')) AS failed,
       avg(extract(epoch FROM completed_at - started_at))
           FILTER (WHERE status = 'completed' AND started_at IS NOT NULL) AS mean_run_seconds
FROM dispatch.tasks
WHERE assigned_agent = %(agent)s AND status IN ('completed', 'failed', 'timed_out', 'cancelled')
  AND completed_at >= now() - interval '1 hour'
"""


class Insights(Queries):
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
        return convert(row, Stats)

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

    async def metrics_gauges(self, *, conn: Conn | None = None) -> dict[str, Any]:
        """The queue gauges read at scrape time: queue_depth {status: n}, oldest_pending_seconds,
        agents {status: n}, event_log_unpublished; flow control's flow_held [{rule, key, tasks}],
        rate_tokens {key: tokens}, concurrency_active {key: [active, max_active]}; by_capability
        and by_tenant (None while flow control is off) [{key, pending, ready,
        oldest_wait_seconds, agents}]."""
        rows = await self._rows(_GAUGES, {"now": None}, conn)
        return dict(rows[0])

    async def flow(self, *, conn: Conn | None = None) -> dict[str, Any]:
        """Flow control for the dashboard: enabled; concurrency [{key, active_tasks, max_active,
        held}]; rate [{key, capacity, refill_per_second, tokens, held}]; fair_share_held."""
        rows = await self._rows(_FLOW, {}, conn)
        return dict(rows[0])

    async def agent_activity(
        self, agent_id: str, *, limit: int = 20, conn: Conn | None = None
    ) -> dict[str, Any]:
        """recent: the last `limit` tasks the agent ended; completed, failed, mean_run_seconds
        over the last hour."""
        params = {"agent": agent_id, "limit": limit}
        recent = await self._rows(_AGENT_RECENT, params, conn)
        hour = dict((await self._rows(_AGENT_HOUR, params, conn))[0])
        if hour["mean_run_seconds"] is not None:
            hour["mean_run_seconds"] = float(hour["mean_run_seconds"])
        return {"recent": recent, **hour}

