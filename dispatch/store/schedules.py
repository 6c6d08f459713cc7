"""Schedules: their rows, the scheduler's look at the due ones, and the fires it records."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from psycopg import sql

from dispatch.models import Schedule, Task
from dispatch.store.base import Conn, Queries, convert, jsonb

# The columns a create or an update may set, in the order of dispatch.schedules.
FIELDS = ("name", "cron", "timezone", "template", "overlap", "catch_up", "catch_up_limit",
          "paused")


def _values(fields: dict[str, Any]) -> dict[str, Any]:
    """The settable columns among `fields`, as parameters (the template as jsonb)."""
    return {f: jsonb(fields[f]) if f == "template" else fields[f] for f in FIELDS if f in fields}


class Schedules(Queries):
    async def create(self, name: str, fields: dict[str, Any], *, conn: Conn) -> Schedule | None:
        """Insert the schedule; None when the name is taken."""
        values = _values({"name": name, **fields})
        query = sql.SQL(
            "INSERT INTO dispatch.schedules ({}) VALUES ({})"
            " ON CONFLICT (name) DO NOTHING RETURNING *"
        ).format(
            sql.SQL(", ").join(map(sql.Identifier, values)),
            sql.SQL(", ").join(map(sql.Placeholder, values)),
        )
        rows = await self._rows(query, values, conn)
        return convert(rows[0], Schedule) if rows else None

    async def update(self, name: str, fields: dict[str, Any], *, conn: Conn) -> Schedule | None:
        values = _values(fields)
        if not values:
            return await self.get(name, conn=conn)
        sets = sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(f), sql.Placeholder(f)) for f in values
        )
        query = sql.SQL(
            "UPDATE dispatch.schedules SET {} WHERE name = %(name)s RETURNING *"
        ).format(sets)
        rows = await self._rows(query, {**values, "name": name}, conn)
        return convert(rows[0], Schedule) if rows else None

    async def get(self, name: str, *, conn: Conn | None = None) -> Schedule | None:
        rows = await self._rows("SELECT * FROM dispatch.schedules WHERE name = %s", (name,), conn)
        return convert(rows[0], Schedule) if rows else None

    async def list_all(self, *, conn: Conn | None = None) -> list[Schedule]:
        rows = await self._rows("SELECT * FROM dispatch.schedules ORDER BY name", (), conn)
        return [convert(r, Schedule) for r in rows]

    async def delete(self, name: str, *, conn: Conn | None = None) -> bool:
        rows = await self._rows(
            "DELETE FROM dispatch.schedules WHERE name = %s RETURNING name", (name,), conn
        )
        return bool(rows)

    async def pause(self, name: str, *, conn: Conn | None = None) -> Schedule:
        rows = await self._rows("SELECT * FROM dispatch.schedule_pause(%s)", (name,), conn)
        return convert(rows[0], Schedule)

    async def resume(self, name: str, *, conn: Conn | None = None) -> Schedule:
        rows = await self._rows("SELECT * FROM dispatch.schedule_resume(%s)", (name,), conn)
        return convert(rows[0], Schedule)

    async def run_now(self, name: str, actor: str, *, conn: Conn | None = None) -> Task:
        return await self._task(
            "SELECT * FROM dispatch.schedule_run_now(%s, %s)", (name, actor), conn
        )

    async def try_template(self, name: str, fields: dict[str, Any], *, conn: Conn) -> None:
        """Make (and take back) the task a fire of this schedule would make: raises what the
        create would (InvalidInput naming the field). `conn` is inside a transaction."""
        async with conn.transaction(force_rollback=True):
            await self._rows(
                "SELECT (dispatch.schedule_task(s, 'try', now())).created"
                " FROM jsonb_populate_record(NULL::dispatch.schedules, %s) s",
                (jsonb({"name": name, **fields}),), conn,
            )

    async def tasks(
        self, name: str, *, limit: int = 20, conn: Conn | None = None
    ) -> list[Task]:
        """The newest tasks the schedule made (fires and runs now), newest first."""
        rows = await self._rows(
            "SELECT * FROM dispatch.tasks WHERE requester = %s AND idempotency_key IS NOT NULL"
            " AND source = 'schedule' ORDER BY created_at DESC LIMIT %s",
            ("schedule:" + name, limit), conn,
        )
        return [convert(r, Task) for r in rows]

    # The scheduler's side.

    async def now(self, *, conn: Conn) -> datetime:
        rows = await self._rows("SELECT now() AS now", (), conn)
        now: datetime = rows[0]["now"]
        return now

    async def lock_due(self, now: datetime, limit: int, *, conn: Conn) -> list[Schedule]:
        """The active schedules due by `now` or still to compute, locked for this transaction;
        those another scheduler holds are skipped."""
        rows = await self._rows(
            "SELECT * FROM dispatch.schedules WHERE NOT paused"
            " AND (next_fire_at IS NULL OR next_fire_at <= %s)"
            " ORDER BY next_fire_at NULLS FIRST LIMIT %s FOR UPDATE SKIP LOCKED",
            (now, limit), conn,
        )
        return [convert(r, Schedule) for r in rows]

    async def seconds_until_due(self, *, conn: Conn | None = None) -> float | None:
        """Seconds from now (the database's clock) to the earliest next fire of an active
        schedule: 0 when one is still to compute, None when no active schedule has one."""
        rows = await self._rows(
            "SELECT CASE WHEN bool_or(next_fire_at IS NULL) THEN 0"
            " ELSE extract(epoch FROM min(next_fire_at) - now())::float8 END AS s"
            " FROM dispatch.schedules WHERE NOT paused", (), conn,
        )
        seconds: float | None = rows[0]["s"]
        return seconds

    async def set_next(self, name: str, at: datetime | None, *, conn: Conn) -> None:
        await self._rows(
            "SELECT FROM dispatch.schedule_fire(%s, '{}', %s)", (name, at), conn
        )

    async def fire(
        self, name: str, fires: list[datetime], next_fire_at: datetime | None, missed: int,
        *, conn: Conn,
    ) -> list[uuid.UUID]:
        rows = await self._rows(
            "SELECT task_id FROM dispatch.schedule_fire(%s, %s, %s, %s)",
            (name, fires, next_fire_at, missed), conn,
        )
        return [r["task_id"] for r in rows]

    async def broken(self, name: str, error: str, *, conn: Conn) -> None:
        await self._rows("SELECT dispatch.schedule_broken(%s, %s)", (name, error[:1000]), conn)
