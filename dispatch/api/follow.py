"""Following a task live: GET /api/v1/tasks/{id}/stream, its events as server-sent events.

One hub per process (the dashboard's, dispatch.ui.hub) keeps, for every task someone follows, the
id of its newest event: one indexed query per followed task per refresh, woken by the events'
NOTIFY (whose lease the hub renews while anyone follows), however many follow it. A stream reads
the task's events only when that id moves past the last one it sent, so an agent's progress
`data` reaches its followers within a refresh, as a stream of partial output. Each message's id
is the event's: a client that reconnects with Last-Event-ID (or ?after=) resumes after it. The
stream ends after the task's last event once the task has ended."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import msgspec
from litestar.response.sse import ServerSentEventMessage

from dispatch.broker import Broker
from dispatch.models import TERMINAL_STATUSES
from dispatch.notify import Listener
from dispatch.ui.hub import KEEP_SECONDS, Hub

# How soon a followed task's new events reach its followers, at most (and how often a busy task's
# newest event id is read while anyone follows it).
REFRESH_SECONDS = 0.2
# Without notifications (none arrive where no listener runs): how often it is read anyway.
TICK_SECONDS = 2.0
# Events read at a time.
BATCH = 500


def follow_hub(broker: Broker, listener: Listener | None) -> Hub:
    async def newest(topic: str) -> str:
        return str(await broker.tasks.last_event_id(uuid.UUID(topic)))

    async def keep() -> None:
        await broker.config.ui_notify_keep(KEEP_SECONDS)

    return Hub(newest, listener=listener, keep=keep, refresh_seconds=REFRESH_SECONDS,
               tick_seconds=TICK_SECONDS)


async def stream(
    broker: Broker, hub: Hub, task_id: uuid.UUID, after: int
) -> AsyncIterator[ServerSentEventMessage]:
    """The task's events after `after`, then each new one as it is written, until the task has
    ended (or the server stops)."""
    yield ServerSentEventMessage(comment="following")
    last = after
    async with hub.subscribe(str(task_id)) as queue:
        while True:
            status, events = await broker.tasks.follow(task_id, last, BATCH)
            for event in events:
                last = event.id
                yield ServerSentEventMessage(
                    id=str(event.id), event=event.event,
                    data=msgspec.json.encode(event).decode(),
                )
            if len(events) == BATCH:
                continue
            if status in TERMINAL_STATUSES:
                yield ServerSentEventMessage(event="end", data=str(status))
                return
            while True:
                newest = await queue.get()
                if newest is None:
                    return
                if int(newest) > last:
                    break
