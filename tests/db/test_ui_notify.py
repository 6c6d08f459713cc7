"""The dashboard's notification lease: event rows NOTIFY dispatch_events while a replica with open
dashboards keeps config.ui_notify_until ahead, and not once it lapses (nor when none ever ran)."""

from __future__ import annotations

from typing import Any

import psycopg

from dispatch.broker import Broker
from dispatch.models import NewTask


async def _notified(listen: psycopg.AsyncConnection[Any], got: list[str], broker: Broker) -> bool:
    """Whether creating a task sends dispatch_events: after its commit, one round trip of the
    listening session delivers every notification already sent to it."""
    got.clear()
    await broker.submit(NewTask(title="t"), requester="alice")
    await listen.execute("SELECT 1")
    return "dispatch_events" in got


async def test_event_rows_notify_only_while_the_lease_runs(
    broker: Broker, db_url: str, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    got: list[str] = []
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as listen:
        listen.add_notify_handler(lambda n: got.append(n.channel))
        await listen.execute("LISTEN dispatch_events")
        assert not await _notified(listen, got, broker)

        await broker.config.ui_notify_keep(60)
        assert await _notified(listen, got, broker)
        until = sql.execute("SELECT ui_notify_until FROM dispatch.config").fetchone()
        # Renewing while more than half the lease is left writes nothing.
        await broker.config.ui_notify_keep(60)
        assert sql.execute("SELECT ui_notify_until FROM dispatch.config").fetchone() == until

        sql.execute("UPDATE dispatch.config SET ui_notify_until = now() - interval '1 second'")
        assert not await _notified(listen, got, broker)
        # A relay's switch still works on its own.
        sql.execute("UPDATE dispatch.config SET events_notify = true")
        assert await _notified(listen, got, broker)
