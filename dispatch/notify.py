"""LISTEN on a dedicated connection and wake asyncio waiters per channel."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

import psycopg
from psycopg import sql

from dispatch.db import LINK_KWARGS
from dispatch.loop import cancel_task

log = logging.getLogger(__name__)

WORK_CHANNEL = "dispatch_work"
EVENTS_CHANNEL = "dispatch_events"
# Payload: the epoch of a deadline an assignment just set (wakes reapers that sleep past it).
DUE_CHANNEL = "dispatch_due"


def due_epoch(payload: str) -> float | None:
    """A dispatch_due payload as the epoch it announces; None for the empty payload a
    reconnect delivers (notifications may have been missed meanwhile)."""
    try:
        return float(payload)
    except ValueError:
        return None
# Payload: an agent id whose tokens were revoked (dispatch.agent_token_revoke).
AUTH_CHANNEL = "dispatch_auth"
# Payload: an agent id the assigner just gave a task (dispatch.task_give): wakes its claims.
ASSIGNED_CHANNEL = "dispatch_assigned"
# A schedule was made, changed, paused or resumed (dispatch.schedules_changed).
SCHEDULES_CHANNEL = "dispatch_schedules"


async def first_set(events: Iterable[asyncio.Event], timeout: float) -> bool:
    """Wait until one of the events is set, or the timeout passes (False)."""
    waits = [asyncio.ensure_future(ev.wait()) for ev in events]
    try:
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    return bool(done)


class Listener:
    """One session connection that LISTENs; `event(channel)` is set at the next notification.

    A waiter takes the event first, then checks the database, then awaits the event, so a
    notification between the check and the wait is never lost. When the connection drops, every
    waiter is woken (to re-check) and the listener reconnects with backoff.
    """

    def __init__(
        self,
        url: str,
        channels: Iterable[str] = (
            WORK_CHANNEL, EVENTS_CHANNEL, DUE_CHANNEL, AUTH_CHANNEL, ASSIGNED_CHANNEL,
            SCHEDULES_CHANNEL,
        ),
    ) -> None:
        self._url = url
        self._channels = tuple(channels)
        self._events = {ch: asyncio.Event() for ch in self._channels}
        self._keyed: dict[tuple[str, str], asyncio.Event] = {}
        self._watchers: dict[str, list[Callable[[str], None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def event(self, channel: str) -> asyncio.Event:
        """The event that the next notification on `channel` sets."""
        return self._events[channel]

    def event_for(self, channel: str, payload: str) -> asyncio.Event:
        """The event that the next notification on `channel` with this payload sets (as does a
        reconnect)."""
        return self._keyed.setdefault((channel, payload), asyncio.Event())

    def watch(self, channel: str, callback: Callable[[str], None]) -> None:
        """Call callback(payload) at every notification on channel ("" after a reconnect, when
        notifications may have been missed)."""
        self._watchers.setdefault(channel, []).append(callback)

    def _fire(self, channel: str, payload: str = "") -> None:
        ev = self._events.get(channel)
        if ev is not None:
            self._events[channel] = asyncio.Event()
            ev.set()
        if payload:
            keyed = self._keyed.pop((channel, payload), None)
            if keyed is not None:
                keyed.set()
        else:  # a reconnect: every keyed waiter re-checks
            for key in [k for k in self._keyed if k[0] == channel]:
                self._keyed.pop(key).set()
        for callback in self._watchers.get(channel, ()):
            callback(payload)

    async def start(self) -> None:
        """Connect and LISTEN; returns once listening."""
        self._task = asyncio.create_task(self._run(), name="dispatch-listener")
        await asyncio.wait_for(self.connected.wait(), 30)

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._url, **LINK_KWARGS)  # type: ignore[arg-type]
                async with conn:
                    for ch in self._channels:
                        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(ch)))
                    self.connected.set()
                    delay = 0.1
                    # Anything that happened while we were away: let waiters re-check.
                    for ch in self._channels:
                        self._fire(ch)
                    async for note in conn.notifies():
                        self._fire(note.channel, note.payload)
            except asyncio.CancelledError:
                raise
            except psycopg.Error as exc:
                log.warning("listener connection lost: %s; reconnecting", exc)
            self.connected.clear()
            for ch in self._channels:
                self._fire(ch)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
