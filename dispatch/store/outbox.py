"""The event log as an outbox: what the NATS relay reads, publishes and marks."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from dispatch.models import TaskEvent
from dispatch.store.base import Conn, Queries, convert


class Outbox(Queries):
    async def relay_lock(self, *, conn: Conn) -> bool:
        """Try the relay's transaction-level advisory lock; False while another replica relays."""
        rows = await self._rows("SELECT dispatch.event_relay_lock() AS locked", (), conn)
        return bool(rows[0]["locked"])

    async def relay_batch(self, limit: int, *, conn: Conn) -> list[TaskEvent]:
        """The oldest unpublished events, locked FOR UPDATE SKIP LOCKED until the transaction
        ends."""
        rows = await self._rows("SELECT * FROM dispatch.event_relay_batch(%s)", (limit,), conn)
        return [convert(r, TaskEvent) for r in rows]

    async def set_aside(self, ids: Sequence[int], error: str, *, conn: Conn | None = None) -> int:
        return await self._count(
            "SELECT dispatch.event_set_aside(%s, %s) AS n", (list(ids), error), conn
        )

    async def mark_published(
        self,
        ids: Sequence[int],
        *,
        since: datetime | None = None,
        now: datetime | None = None,
        conn: Conn | None = None,
    ) -> int:
        """Mark the events `ids` published; `since`, when given, is a bound no older than their
        oldest created_at (the history partitions before it are not searched)."""
        return await self._count(
            "SELECT dispatch.event_mark_published(%s, coalesce(%s, now()),"
            " coalesce(%s, '-infinity')) AS n",
            (list(ids), now, since),
            conn,
        )
