"""The settings row, dispatch.config, that the SQL functions read: the assignment settings every
replica writes at start, and the switches that turn event NOTIFYs on."""

from __future__ import annotations

from psycopg import sql

from dispatch.settings import AssignmentSettings
from dispatch.store.base import Conn, Queries, Row


def config_row(a: AssignmentSettings) -> dict[str, tuple[str, object]]:
    """dispatch.config column -> (the setting it holds, the value written for it)."""
    return {
        "default_timeout_seconds": ("default_timeout_ms", max(1, a.default_timeout_ms // 1000)),
        "max_concurrent_per_agent": ("max_concurrent_per_agent", a.max_concurrent_per_agent),
        "owner_filter_enabled": ("owner_filter_enabled", a.owner_filter_enabled),
        "retry_backoff_ms": ("retry_backoff_ms", a.retry_backoff_ms),
        "retry_backoff_max_ms": ("retry_backoff_max_ms", a.retry_backoff_max_ms),
        "wake_timeout_ms": ("wake_timeout_ms", a.wake_timeout_ms),
        "unmatched_repeat_ms": ("unmatched_repeat_ms", a.unmatched_repeat_ms),
        "tick_interval_ms": ("tick_interval_ms", a.tick_interval_ms),
        "aging_ms": ("aging_ms", a.aging_ms),
    }


_APPLY = sql.SQL("UPDATE dispatch.config SET {columns}, updated_at = now() RETURNING 1").format(
    columns=sql.SQL(", ").join(
        sql.SQL("{} = {}").format(sql.Identifier(column), sql.Placeholder(column))
        for column in config_row(AssignmentSettings())
    )
)


class Config(Queries):
    async def get(self, *, conn: Conn | None = None) -> Row:
        rows = await self._rows("SELECT * FROM dispatch.config", (), conn)
        return rows[0]

    async def apply(self, a: AssignmentSettings, *, conn: Conn | None = None) -> list[str]:
        """Write the assignment settings the SQL functions read; returns the settings whose
        stored values differed (nothing is written when none did)."""
        row = config_row(a)
        async with self._borrow_transaction(conn) as c:
            current = await self.get(conn=c)
            differing = [key for column, (key, value) in row.items() if current[column] != value]
            if differing:
                await self._rows(_APPLY, {column: value for column, (_, value) in row.items()}, c)
        return differing

    async def relay_running(self, *, conn: Conn | None = None) -> None:
        """A relay runs: from now on new event rows NOTIFY dispatch_events (it stays on; a DBA
        can turn it off when no replica relays any more)."""
        await self._rows(
            "UPDATE dispatch.config SET events_notify = true WHERE NOT events_notify"
            " RETURNING 1", (), conn,
        )

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
