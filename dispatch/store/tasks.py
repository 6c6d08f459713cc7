"""Tasks: creation, reads, the claim and the assigner's batch, every transition, the reaper's
calls and explain's rows."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Literal, assert_never

import msgspec
from psycopg import sql
from psycopg.types.json import Jsonb

from dispatch import models
from dispatch.errors import NotFound
from dispatch.models import (
    Assignment,
    Change,
    Cursor,
    Expiry,
    NewTask,
    ReportOutcome,
    Task,
    TaskEvent,
    TaskFilter,
)
from dispatch.store.base import Conn, Queries, Row, convert, jsonb

# dispatch.task_create called with named arguments, one per field of NewTask (whose names are the
# function's parameters), so a field is declared in the struct and the function, nowhere else.
# Composed once, here: psycopg composes a sql.Composed again at every execute (about 40 us).
_NEW_TASK_FIELDS = msgspec.structs.fields(NewTask)
_CREATE = sql.SQL(
    "SELECT (r.task).*, r.created FROM dispatch.task_create({args}) r"
).format(
    args=sql.SQL(", ").join(
        sql.SQL("{} => {}").format(sql.Identifier(name), sql.Placeholder(name))
        for name in [f.name for f in _NEW_TASK_FIELDS]
        + ["requester", "idempotency_key", "viewer", "trace_context", "announce"]
    )
).as_bytes(None)

# What a loop sleeps until (Tasks.seconds_until_due): the reaper a deadline, the assigner a task
# becoming available, a DBA both.
DueKind = Literal["all", "deadline", "available"]
_DUE_CALLS: dict[DueKind, str] = {
    "all": "dispatch.next_due(t.now)",
    "deadline": "dispatch.next_deadline()",
    "available": "dispatch.next_available(t.now)",
}
_SECONDS_UNTIL = "extract(epoch FROM {} - t.now)::float8"
_DUE = {
    kind: f"SELECT {_SECONDS_UNTIL.format(call)} AS s"
    " FROM (SELECT coalesce(%s::timestamptz, now()) AS now) t"
    for kind, call in _DUE_CALLS.items()
}

# The round's rows, then one row with only `due`, `full` and `lost` (an Append runs its
# branches in order: the second runs after task_assign, whose verdicts `full` and `lost` it
# reads; and it reads the statement's snapshot, which is all next_available needs: a round gives
# only tasks that are available already).
_ASSIGN_ROUND = f"""
WITH t AS (SELECT coalesce(%s::timestamptz, now()) AS now)
SELECT a.*, NULL::float8 AS due, NULL::boolean AS full, NULL::boolean AS lost
FROM t, dispatch.task_assign(%s, t.now) a
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       {_SECONDS_UNTIL.format(_DUE_CALLS["available"])},
       current_setting('dispatch.assign_full', true) IS NOT DISTINCT FROM 'on',
       current_setting('dispatch.assign_lost', true) IS NOT DISTINCT FROM 'on' FROM t
"""

_LIST = """
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

# The dashboard's listing: the API's filters and a search (a title substring, an id prefix, one
# metadata key=value), newest or oldest first by creation. The order is a top-N sort of the rows
# that match (no index on creation time: every create would pay for one); the dashboard's hub
# spaces its refreshes by how long they take.
_UI_WHERE = """
WHERE (%(statuses)s::dispatch.task_status[] IS NULL OR status = ANY (%(statuses)s))
  AND (%(requester)s::text IS NULL OR requester = %(requester)s)
  AND (%(owner)s::text IS NULL OR owner = %(owner)s)
  AND (%(assignee)s::text IS NULL OR assigned_agent = %(assignee)s)
  AND (%(capability)s::text IS NULL OR required_capabilities @> ARRAY[%(capability)s::text])
  AND (%(title)s::text IS NULL OR title ILIKE %(title)s)
  AND (%(id_prefix)s::text IS NULL OR task_id::text LIKE %(id_prefix)s)
  AND (%(metadata)s::jsonb IS NULL OR metadata @> %(metadata)s)
"""
_UI_LIST = {
    "newest": "SELECT * FROM dispatch.tasks" + _UI_WHERE + """
  AND (%(c_created)s::timestamptz IS NULL
       OR (created_at, task_id) < (%(c_created)s, %(c_id)s::uuid))
ORDER BY created_at DESC, task_id DESC LIMIT %(limit)s""",
    "oldest": "SELECT * FROM dispatch.tasks" + _UI_WHERE + """
  AND (%(c_created)s::timestamptz IS NULL
       OR (created_at, task_id) > (%(c_created)s, %(c_id)s::uuid))
ORDER BY created_at, task_id LIMIT %(limit)s""",
}
_UI_IDS = "SELECT task_id FROM dispatch.tasks" + _UI_WHERE + """
ORDER BY created_at, task_id LIMIT %(limit)s"""
_UI_COUNT = "SELECT count(*) AS n FROM (SELECT 1 FROM dispatch.tasks" + _UI_WHERE + """
LIMIT %(limit)s) x"""


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _ui_params(filters: TaskFilter) -> dict[str, object]:
    return {
        "statuses": [str(s) for s in filters.statuses] if filters.statuses else None,
        "requester": filters.requester,
        "owner": filters.owner,
        "assignee": filters.assignee,
        "capability": filters.capability.strip().lower() if filters.capability else None,
        "title": f"%{_like(filters.title)}%" if filters.title else None,
        "id_prefix": f"{filters.id_prefix}%" if filters.id_prefix else None,
        "metadata": Jsonb(filters.metadata) if filters.metadata is not None else None,
    }


def _outcome(reports: Sequence[Mapping[str, object]], r: Row) -> ReportOutcome:
    """One row of dispatch.task_report_batch as the outcome of reports[ord - 1]."""
    return ReportOutcome(
        task_id=_report_task_id(reports[r["ord"] - 1]),
        status=r["status"],
        task=msgspec.convert(r["task"], Task, strict=False) if r["task"] else None,
        error=r["error"],
        field=r["field"],
    )


def _claimed_next(rows: Sequence[Row]) -> tuple[Claimed, str | None]:
    """The rows of dispatch.task_claim_next among a report's: the tasks claimed (and how many of
    them the claim assigned), or the claim's error."""
    claimed = Claimed(
        msgspec.convert(r["task"], Task, strict=False) for r in rows if r["part"] == "next"
    )
    claimed.assigned = sum(1 for r in rows if r["part"] == "next" and r["fresh"])
    error = next((r["error"] for r in rows if r["part"] == "error"), None)
    return claimed, error


def _report_task_id(report: Mapping[str, object]) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(report.get("task_id")))
    except ValueError:
        return None


class Claimed(list[Task]):
    """What a claim returned; `assigned`: how many of them it assigned (the others were the
    agent's own tasks, assigned to it before, and counted then)."""

    assigned: int = 0


class Tasks(Queries):
    async def create(
        self,
        new: NewTask,
        *,
        requester: str,
        idempotency_key: str | None = None,
        viewer: str | None = None,
        trace_context: Mapping[str, str] | None = None,
        announce: bool = True,
        conn: Conn | None = None,
    ) -> tuple[Task, bool]:
        """Create a task; with a repeated idempotency key return the existing one and False. Its
        dependencies must be visible to `viewer` (None: any task); `trace_context` is stored
        with it. `announce` False: no NOTIFY dispatch_work; the caller wakes an assigner."""
        params: dict[str, object] = msgspec.structs.asdict(new)
        params["metadata"] = Jsonb(new.metadata)
        params["depends_on"] = (
            Jsonb(msgspec.to_builtins(new.depends_on)) if new.depends_on else None
        )
        params["viewer"] = viewer
        params["requester"] = requester
        params["idempotency_key"] = idempotency_key
        params["trace_context"] = jsonb(trace_context)
        params["announce"] = announce
        row = dict((await self._rows(_CREATE, params, conn))[0])
        created = bool(row.pop("created"))
        return convert(row, Task), created

    async def get(self, task_id: uuid.UUID, *, conn: Conn | None = None) -> Task:
        """The task; NotFound when there is none."""
        rows = await self._rows(
            "SELECT * FROM dispatch.tasks WHERE task_id = %s", (task_id,), conn
        )
        if not rows:
            raise NotFound(f"task {task_id} not found")
        return convert(rows[0], Task)

    async def by_id(
        self, task_ids: Sequence[uuid.UUID], *, conn: Conn | None = None
    ) -> dict[uuid.UUID, Task]:
        rows = await self._rows(
            "SELECT * FROM dispatch.tasks WHERE task_id = ANY (%s)", (list(task_ids),), conn
        )
        return {r["task_id"]: convert(r, Task) for r in rows}

    async def page(
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
        return [convert(r, Task) for r in await self._rows(_LIST, params, conn)]

    async def ui_page(
        self, filters: TaskFilter, *, order: str = "newest", limit: int = 50,
        after: Cursor | None = None, conn: Conn | None = None,
    ) -> list[Task]:
        """The dashboard's listing (filters with its search), `order` newest or oldest first."""
        params = {**_ui_params(filters), "limit": limit,
                  "c_created": after.created_at if after else None,
                  "c_id": after.task_id if after else None}
        return [convert(r, Task) for r in await self._rows(_UI_LIST[order], params, conn)]

    async def ui_ids(
        self, filters: TaskFilter, *, limit: int, conn: Conn | None = None
    ) -> list[uuid.UUID]:
        """The ids of the first `limit` tasks the dashboard's filters select, oldest first."""
        rows = await self._rows(_UI_IDS, {**_ui_params(filters), "limit": limit}, conn)
        return [r["task_id"] for r in rows]

    async def ui_count(self, filters: TaskFilter, *, limit: int, conn: Conn | None = None) -> int:
        """How many tasks the filters select, counted up to `limit`."""
        rows = await self._rows(_UI_COUNT, {**_ui_params(filters), "limit": limit}, conn)
        return int(rows[0]["n"])

    async def events(self, task_id: uuid.UUID, *, conn: Conn | None = None) -> list[TaskEvent]:
        """The task's history, oldest first; NotFound when there is no such task."""
        async with self._borrow(conn) as c:
            rows = await self._rows(
                "SELECT * FROM dispatch.task_events WHERE task_id = %s ORDER BY id", (task_id,), c
            )
            if not rows:
                await self.get(task_id, conn=c)
        return [convert(r, TaskEvent) for r in rows]

    async def follow(
        self, task_id: uuid.UUID, after: int, limit: int, *, conn: Conn | None = None
    ) -> tuple[models.TaskStatus, list[TaskEvent]]:
        """The task's status and its events after event id `after`, oldest first (at most
        `limit`): what a follower has yet to see. NotFound when there is no such task."""
        async with self._borrow(conn) as c:
            task = await self.get(task_id, conn=c)
            rows = await self._rows(
                "SELECT * FROM dispatch.task_events WHERE task_id = %s AND id > %s"
                " ORDER BY id LIMIT %s", (task_id, after, limit), c,
            )
        return task.status, [convert(r, TaskEvent) for r in rows]

    async def last_event_id(self, task_id: uuid.UUID, *, conn: Conn | None = None) -> int:
        """The id of the task's newest event (0: none)."""
        rows = await self._rows(
            "SELECT coalesce(max(id), 0) AS id FROM dispatch.task_events WHERE task_id = %s",
            (task_id,), conn,
        )
        return int(rows[0]["id"])

    async def claim(
        self,
        agent_id: str,
        capabilities: Sequence[str] | None = None,
        *,
        max_tasks: int = 1,
        start: bool = False,
        key: str | None = None,
        now: datetime | None = None,
        conn: Conn | None = None,
    ) -> list[Task]:
        """Up to max_tasks of the best tasks this agent may take (started with `start`): its own
        pushed tasks first, then new ones (Claimed.assigned counts these). A claim repeated with
        its idempotency `key` returns what the first one took (its answer was lost)."""
        rows = await self._rows(
            "SELECT c.*, c.assigned_at = coalesce(%s, now()) AS fresh"
            " FROM dispatch.task_claim(%s, %s, coalesce(%s, now()), %s, %s, %s) c",
            (now, agent_id, list(capabilities) if capabilities is not None else None, now,
             max_tasks, start, key),
            conn,
        )
        claimed = Claimed(convert(r, Task) for r in rows)
        claimed.assigned = sum(1 for r in rows if r["fresh"])
        return claimed

    async def report_batch(
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
        return [_outcome(reports, r) for r in rows]

    async def report_batch_then_claim(
        self,
        agent_id: str,
        reports: Sequence[Mapping[str, object]],
        then: int,
        *,
        max_tasks: int = 1,
        start: bool = False,
        admin: bool = False,
        now: datetime | None = None,
        conn: Conn | None = None,
    ) -> tuple[list[ReportOutcome], Claimed, str | None]:
        """report_batch and, when the report at index `then` was applied, the agent's claim of
        its next tasks, in one statement (dispatch.task_report_batch_then_claim): a failed claim
        leaves the reports standing and comes back as its message."""
        rows = await self._rows(
            "SELECT * FROM dispatch.task_report_batch_then_claim(%s, %s, %s, coalesce(%s, now()),"
            " %s, %s, %s)",
            (agent_id, Jsonb(list(reports)), admin, now, then + 1, max_tasks, start),
            conn,
        )
        outcomes = [_outcome(reports, r) for r in rows if r["part"] == "report"]
        return outcomes, *_claimed_next(rows)

    async def assign(
        self, batch: int, *, now: datetime | None = None, conn: Conn | None = None
    ) -> list[Assignment]:
        """One assignment batch (SKIP LOCKED); each with the seconds its task waited."""
        rows = await self._rows(
            "SELECT * FROM dispatch.task_assign(%s, coalesce(%s::timestamptz, now()))",
            (batch, now),
            conn,
        )
        return [convert(r, Assignment) for r in rows]

    async def assign_round(
        self, batch: int, *, now: datetime | None = None, conn: Conn | None = None
    ) -> tuple[list[Assignment], float | None, bool, bool]:
        """One assignment batch, and in the same statement the assigner's next due instant
        (seconds_until_due("available")): one round trip for a round that ends a wake-up. Then
        whether the batch found work waiting and no agent with room for any of it (`full`), and
        whether it picked a task that it could not give, its agent's slot held by a claim at
        that moment (`lost`)."""
        rows = await self._rows(_ASSIGN_ROUND, (now, batch), conn)
        due: float | None = rows[-1]["due"]
        return ([convert(r, Assignment) for r in rows[:-1]], due, bool(rows[-1]["full"]),
                bool(rows[-1]["lost"]))

    async def apply(
        self, change: Change, *, now: datetime | None = None, conn: Conn | None = None
    ) -> Task:
        """The change's SQL function; its errors (409 fencing, 403, 404) as the function raises
        them."""
        call, params = _call(change, now)
        return await self._task(f"SELECT * FROM {call}", params, conn)

    async def apply_then_claim(
        self,
        change: Change,
        agent_id: str,
        *,
        max_tasks: int = 1,
        start: bool = False,
        announce: bool = True,
        now: datetime | None = None,
        conn: Conn | None = None,
    ) -> tuple[Task, Claimed, str | None]:
        """The change, then the agent's claim of its next tasks, in one statement (one round
        trip, dispatch.task_then_claim): the change's errors as `apply` raises them; a failed
        claim leaves the change standing and comes back as its message. `announce` False: a
        slot the change freed and the claim left empty is not announced by NOTIFY; the caller
        wakes an assigner."""
        call, params = _call(change, now, refill=True)
        rows = await self._rows(
            f"SELECT * FROM dispatch.task_then_claim({call}, %s, %s, %s, coalesce(%s, now()), %s)",
            (*params, agent_id, max_tasks, start, now, announce),
            conn,
        )
        done = msgspec.convert(rows[0]["task"], Task, strict=False)
        return done, *_claimed_next(rows)

    async def expire(
        self, *, now: datetime | None = None, limit: int = 100, conn: Conn | None = None
    ) -> list[Expiry]:
        rows = await self._rows(
            "SELECT * FROM dispatch.task_expire(coalesce(%s, now()), %s)", (now, limit), conn
        )
        return [convert(r, Expiry) for r in rows]

    async def park_unmatched(
        self, *, now: datetime | None = None, conn: Conn | None = None
    ) -> int:
        """Park pending tasks no agent of the directory could take (and bring back those one
        could now), looking at a share of the line and going on from there at the next call;
        returns how many were parked."""
        return await self._count(
            "SELECT dispatch.task_park_unmatched(coalesce(%s, now())) AS n", (now,), conn
        )

    async def report_unmatched(
        self, *, now: datetime | None = None, limit: int = 100, conn: Conn | None = None
    ) -> int:
        """Report pending tasks no agent can take (a share of the line a call, as
        park_unmatched); returns how many were reported."""
        return await self._count(
            "SELECT dispatch.task_report_unmatched(coalesce(%s, now()), %s) AS n",
            (now, limit),
            conn,
        )

    async def seconds_until_due(
        self, what: DueKind = "all", *, now: datetime | None = None, conn: Conn | None = None
    ) -> float | None:
        """Seconds from now to the next instant due (negative when overdue): `deadline` for the
        reaper (dispatch.next_deadline), `available` for the assigner (dispatch.next_available,
        a scheduled or backed-off task), `all` for both (dispatch.next_due); None if nothing is."""
        rows = await self._rows(_DUE[what], (now,), conn)
        s: float | None = rows[0]["s"]
        return s

    async def prune(self, before: datetime, limit: int = 1000, *, conn: Conn | None = None) -> int:
        return await self._count("SELECT dispatch.task_prune(%s, %s) AS n", (before, limit), conn)

    async def history_prepare(
        self, start: datetime, end: datetime, width: timedelta, *, conn: Conn | None = None
    ) -> int:
        """Create the history partitions missing for [start, end) (and for rows in the default
        partition); how many were created."""
        return await self._count(
            "SELECT dispatch.history_prepare(%s, %s, %s) AS n", (start, end, width), conn
        )

    async def history_drop(self, before: datetime, *, conn: Conn | None = None) -> int:
        """Drop the history partitions that end at or before `before`; how many were dropped."""
        return await self._count("SELECT dispatch.history_drop(%s) AS n", (before,), conn)

    async def history_state(
        self, before: datetime, width: timedelta, *, conn: Conn | None = None
    ) -> Row:
        """`overdue`: partitions still there that end at or before `before`; `unplaced`: rows
        in the default partition that should have a partition by now (those of the clock's own
        slot wait there until it is past); `until`: the end of the last partition."""
        rows = await self._rows(
            "SELECT count(*) FILTER (WHERE to_at <= %(before)s) AS overdue, max(to_at) AS until,"
            " (SELECT count(*) FROM dispatch.task_events_default"
            "  WHERE created_at < now() - %(width)s - interval '10 minutes'"
            "     OR created_at > now() + interval '5 minutes') AS unplaced"
            " FROM dispatch.history_partitions",
            {"before": before, "width": width},
            conn,
        )
        return rows[0]

    async def dependencies(
        self, task: Task, *, conn: Conn | None = None
    ) -> models.Dependencies:
        """The task's dependencies, with their results, and its dependents."""
        async with self._borrow(conn) as c:
            deps = await self._rows(
                "SELECT depends_on AS task_id, title, status, on_failure, satisfied, result,"
                " error, completed_at FROM dispatch.dependencies WHERE task_id = %s"
                " ORDER BY created_at, depends_on",
                (task.task_id,), c,
            )
            dependents = await self._rows(
                "SELECT task_id FROM dispatch.task_dependencies WHERE depends_on = %s"
                " ORDER BY created_at, task_id",
                (task.task_id,), c,
            )
        return models.Dependencies(
            task_id=task.task_id, status=task.status, waiting_on=task.waiting_on,
            dependencies=[convert(r, models.DependencyState) for r in deps],
            dependents=[r["task_id"] for r in dependents],
        )

    async def explain(self, task_id: uuid.UUID, *, conn: Conn | None = None) -> list[Row]:
        return await self._rows("SELECT * FROM dispatch.task_explain(%s)", (task_id,), conn)

    async def last_assignment(self, task_id: uuid.UUID, *, conn: Conn | None = None) -> Row | None:
        """The task's latest `assigned` event (who chose the agent, with what score)."""
        rows = await self._rows(
            "SELECT actor, payload, created_at FROM dispatch.task_events"
            " WHERE task_id = %s AND event = 'assigned' ORDER BY id DESC LIMIT 1", (task_id,), conn,
        )
        return rows[0] if rows else None

    async def hold(
        self, task_id: uuid.UUID, *, now: datetime | None = None, conn: Conn | None = None
    ) -> Row:
        """The task's tenant, effective priority and the flow rules holding it back now."""
        rows = await self._rows(
            "SELECT * FROM dispatch.task_hold(%s, coalesce(%s::timestamptz, now()))",
            (task_id, now), conn,
        )
        return rows[0]


def _call(
    change: Change, now: datetime | None, *, refill: bool = False
) -> tuple[str, tuple[object, ...]]:
    """The call of the change's SQL function, as an expression, and its parameters. `refill`: the
    agent claims its next tasks in the same statement (a completion or failure then leaves the
    announcement of the slot it frees to that claim: dispatch.refill_promise)."""
    match change:
        case models.Start():
            return ("dispatch.task_start(%s, %s, coalesce(%s, now()), %s)",
                    (change.task_id, change.agent_id, now, change.lease))
        case models.Progress():
            return ("dispatch.task_progress(%s, %s, %s::float8, %s, %s, coalesce(%s, now()), %s)",
                    (change.task_id, change.agent_id, change.percent, change.message,
                     jsonb(change.data), now, change.lease))
        case models.Complete():
            return ("dispatch.task_complete(%s, %s, %s, %s, coalesce(%s, now()), %s, %s)",
                    (change.task_id, change.actor, jsonb(change.result), change.admin, now,
                     change.lease, refill))
        case models.Fail():
            return ("dispatch.task_fail(%s, %s, %s, %s, coalesce(%s, now()), %s, %s)",
                    (change.task_id, change.agent_id, change.error, change.retry_eligible, now,
                     change.lease, refill))
        case models.Cancel():
            return ("dispatch.task_cancel(%s, %s, %s, %s, coalesce(%s, now()))",
                    (change.task_id, change.actor, change.reason, change.admin, now))
        case models.Update():
            return ("dispatch.task_update(%s, %s, %s, %s, %s, coalesce(%s, now()))",
                    (change.task_id, change.actor, jsonb(change.metadata_patch), change.priority,
                     change.admin, now))
        case models.Requeue():
            return ("dispatch.task_requeue(%s, %s, coalesce(%s, now()))",
                    (change.task_id, change.actor, now))
        case models.Release():
            return ("dispatch.task_release(%s, %s, %s, coalesce(%s, now()), %s)",
                    (change.task_id, change.agent_id, change.reason, now, change.lease))
        case models.Depend():
            return ("dispatch.task_depend(%s, %s, %s, %s, %s, %s, coalesce(%s, now()))",
                    (change.task_id, change.depends_on, change.actor, change.on_failure,
                     change.admin, change.viewer, now))
        case models.Approve():
            return ("dispatch.task_approve(%s, %s, %s, coalesce(%s, now()))",
                    (change.task_id, change.actor, change.admin, now))
        case models.Reject():
            return ("dispatch.task_reject(%s, %s, %s, %s, coalesce(%s, now()))",
                    (change.task_id, change.actor, change.reason, change.admin, now))
        case models.Accept():
            return ("dispatch.task_accept(%s, %s, %s, coalesce(%s, now()))",
                    (change.task_id, change.actor, change.admin, now))
        case models.RequestChanges():
            return ("dispatch.task_request_changes(%s, %s, %s, %s, coalesce(%s, now()))",
                    (change.task_id, change.actor, change.feedback, change.admin, now))
        case models.Suspend():
            return ("dispatch.task_suspend(%s, %s, %s, %s, coalesce(%s, now()), %s)",
                    (change.task_id, change.agent_id, change.waiting_for, change.timeout_seconds,
                     now, change.lease))
        case models.Signal():
            return ("dispatch.task_signal(%s, %s, %s, %s, coalesce(%s, now()))",
                    (change.task_id, change.actor, Jsonb(change.payload), change.admin, now))
        case models.Undepend():
            return ("dispatch.task_undepend(%s, %s, %s, %s, coalesce(%s, now()))",
                    (change.task_id, change.depends_on, change.actor, change.admin, now))
        case _:
            assert_never(change)
