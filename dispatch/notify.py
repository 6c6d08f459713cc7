"""LISTEN on a dedicated connection and wake asyncio waiters per channel; under
`serve --workers N`, one LISTEN for all N workers (`Fanout`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

import msgspec
import psycopg
from psycopg import sql

from dispatch.db import LINK_KWARGS
from dispatch.loop import cancel_task

log = logging.getLogger(__name__)

WORK_CHANNEL = "dispatch_work"
EVENTS_CHANNEL = "dispatch_events"
# The payload of a new task's dispatch_work: new work, no room freed (see engine/assigner.py).
CREATED = "created"
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
# Payload: an agent id the assigner just gave a task (dispatch.tasks_give): wakes its claims.
ASSIGNED_CHANNEL = "dispatch_assigned"
# A schedule was made, changed, paused or resumed (dispatch.schedules_changed).
SCHEDULES_CHANNEL = "dispatch_schedules"
CHANNELS = (
    WORK_CHANNEL, EVENTS_CHANNEL, DUE_CHANNEL, AUTH_CHANNEL, ASSIGNED_CHANNEL, SCHEDULES_CHANNEL,
)
# A worker of serve --workers N: the path of its supervisor's Fanout socket.
NOTIFY_SOCKET_ENV = "_DISPATCH_NOTIFY_SOCKET"
# Not a Postgres channel: the event the assigner sleeps on. Set with each dispatch_work when
# this process's assigner is the one that work wakes (Listener.wakes_assigner).
ASSIGNER_WAKE = "assigner"
# A Fanout's line to the one worker whose assigner dispatch_work wakes.
_CHOSEN = ("", ASSIGNER_WAKE)
_CHOSEN_LINE = msgspec.json.encode(_CHOSEN) + b"\n"


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

    With `relay` (the socket of a Fanout) it hears the fanout's one LISTEN instead of holding
    its own: the same notifications in the same order, the same wake-ups when that LISTEN's
    connection drops or comes back. Only one of the fanout's workers wakes its assigner at
    dispatch_work (`wakes_assigner`), the one the fanout chose: the others' assigners run on
    their ticks, as a backup.
    """

    def __init__(
        self, url: str, channels: Iterable[str] = CHANNELS, *, relay: str = "",
    ) -> None:
        self._url = url
        self._relay = relay
        self._channels = tuple(channels)
        self._events = {ch: asyncio.Event() for ch in (*self._channels, ASSIGNER_WAKE)}
        self.wakes_assigner = not relay
        self._keyed: dict[tuple[str, str], asyncio.Event] = {}
        self._watchers: dict[str, list[Callable[[str], None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._to_fanout: asyncio.StreamWriter | None = None  # while the relay is connected
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

    def announce(self, payload: str) -> None:
        """Work this process made without a NOTIFY (Broker.announce), heard as a dispatch_work
        with this payload by the worker of this `serve` whose assigner work wakes: here when
        this is that worker, else through the fanout, which passes it on to that worker alone.
        Without a fanout (or while it is out of reach) it is heard here, waking this process's
        assigner whether or not it is the chosen one. The other workers need not hear it: it
        only wakes an assigner (a dashboard refreshes on the new task's event, which NOTIFYs
        while one is open)."""
        to_fanout = self._to_fanout
        if not self.wakes_assigner and to_fanout is not None and not to_fanout.is_closing():
            to_fanout.write(msgspec.json.encode((WORK_CHANNEL, payload)) + b"\n")
            return
        self._fire(WORK_CHANNEL, payload)
        if not self.wakes_assigner:
            self._fire(ASSIGNER_WAKE)

    def _fire(self, channel: str, payload: str = "") -> None:
        if channel == WORK_CHANNEL and self.wakes_assigner:
            self._fire(ASSIGNER_WAKE)
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

    @property
    def channels(self) -> tuple[str, ...]:
        return self._channels

    async def start(self, *, wait: bool = True) -> None:
        """Connect and LISTEN; with `wait`, returns once listening."""
        self._task = asyncio.create_task(self._run(), name="dispatch-listener")
        if wait:
            await asyncio.wait_for(self.connected.wait(), 30)

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                async for note in self._relayed() if self._relay else self._listened():
                    if note is None:  # listening (again)
                        self.connected.set()
                        delay = 0.1
                        # Anything that happened while we were away: let waiters re-check.
                        for ch in self._channels:
                            self._fire(ch)
                    elif note == _CHOSEN:
                        self.wakes_assigner = True
                        self._fire(WORK_CHANNEL)  # its sibling's work, unheard meanwhile
                    else:
                        self._fire(*note)
                log.warning("listener's relay closed; reconnecting")
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError, msgspec.DecodeError) as exc:
                log.warning("listener connection lost: %s; reconnecting", exc)
            self.connected.clear()
            for ch in self._channels:
                self._fire(ch)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _listened(self) -> AsyncIterator[tuple[str, str] | None]:
        """None once listening, then each notification as (channel, payload)."""
        conn = await psycopg.AsyncConnection.connect(self._url, **LINK_KWARGS)  # type: ignore[arg-type]
        async with conn:
            for ch in self._channels:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(ch)))
            yield None
            async for note in conn.notifies():
                yield note.channel, note.payload

    async def _relayed(self) -> AsyncIterator[tuple[str, str] | None]:
        """The same, heard from a Fanout: a line `[]` once it listens, then `[channel, payload]`
        lines."""
        self.wakes_assigner = False  # until the fanout says so again
        reader, writer = await asyncio.open_unix_connection(self._relay)
        self._to_fanout = writer
        try:
            while line := await reader.readline():
                note = msgspec.json.decode(line, type=list[str])
                if len(note) not in (0, 2):
                    raise msgspec.DecodeError(f"not a notification: {line!r}")
                yield (note[0], note[1]) if note else None
        finally:
            self._to_fanout = None
            writer.close()


class Fanout:
    """One LISTEN for every worker of `serve --workers N`, passed on to each over a Unix socket.

    Postgres signals every session that LISTENs in a database at each NOTIFY, and each of them
    reads the notification in a transaction of its own: N workers listening for themselves cost N
    transactions per NOTIFY, this costs one. A worker's Listener(relay=path) hears it; a worker
    that stops reading (far behind by MAX_BACKLOG bytes) is cut off and re-checks when it
    reconnects, as after any reconnect.

    dispatch_work wakes the assigner of one worker only, the longest connected (told so by a
    line `["", "assigner"]`; the next is told when it goes). Every worker's assigner woken at
    each new task ran one round that gave it and N - 1 that found it taken, competing for the
    same rows.

    A worker announces the work it made without a NOTIFY (Listener.announce) by a line
    `["dispatch_work", payload]`, passed on to the chosen worker alone as if Postgres had sent
    it (an announcement only wakes an assigner; with N workers, passing each new task's to all
    of them cost N reads and wake-ups a task)."""

    MAX_BACKLOG = 1 << 20

    def __init__(self, url: str, path: Path) -> None:
        self.path = path
        self.listener = Listener(url)
        self.bound = threading.Event()  # the socket accepts workers
        self._clients: dict[asyncio.StreamWriter, None] = {}  # in the order they came
        self._chosen: asyncio.StreamWriter | None = None
        self._serving: set[asyncio.Task[object]] = set()
        for ch in self.listener.channels:
            self.listener.watch(ch, functools.partial(self._send, ch))

    async def run(self, stop: asyncio.Event) -> None:
        """Serve the socket until `stop` is set."""
        self.path.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        self.bound.set()
        await self.listener.start(wait=False)  # it retries until the database answers
        try:
            await stop.wait()
        finally:
            server.close()
            for task in self._serving:
                task.cancel()
            await asyncio.gather(*self._serving, return_exceptions=True)
            await self.listener.stop()

    def _send(self, channel: str, payload: str) -> None:
        """A notification from Postgres: to every worker."""
        line = msgspec.json.encode((channel, payload)) + b"\n"
        for writer in list(self._clients):
            self._write(writer, line)

    def _pass_on(self, payload: str) -> None:
        """A worker's announcement: to the chosen worker."""
        if self._chosen is not None:
            self._write(self._chosen, msgspec.json.encode((WORK_CHANNEL, payload)) + b"\n")

    def _write(self, writer: asyncio.StreamWriter, line: bytes) -> None:
        if writer.transport.get_write_buffer_size() > self.MAX_BACKLOG:
            log.warning("a worker stopped reading notifications; cutting it off")
            self._drop(writer)
        else:
            writer.write(line)

    def _drop(self, writer: asyncio.StreamWriter) -> None:
        self._clients.pop(writer, None)
        writer.close()
        if writer is self._chosen:
            self._chosen = None
        self._choose()

    def _choose(self) -> None:
        """With none chosen, the longest connected worker's assigner is the one work wakes."""
        if self._chosen is None and self._clients:
            self._chosen = next(iter(self._clients))
            self._chosen.write(_CHOSEN_LINE)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        try:
            await self.listener.connected.wait()
            self._clients[writer] = None
            writer.write(b"[]\n")  # listening: what came before this is the worker's to re-check
            self._choose()
            while line := await reader.readline():  # until the worker goes
                note = msgspec.json.decode(line, type=list[str])
                if len(note) != 2 or note[0] != WORK_CHANNEL:
                    raise msgspec.DecodeError(f"not an announcement: {line!r}")
                self._pass_on(note[1])
        except (OSError, ValueError, msgspec.DecodeError, asyncio.CancelledError):
            pass  # gone, or garbled: cut off; it reconnects and re-checks
        finally:
            self._serving.discard(task)
            self._drop(writer)


class FanoutThread:
    """A Fanout on its own thread and event loop, beside the supervisor's loop."""

    def __init__(self, fanout: Fanout) -> None:
        self.fanout = fanout
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="dispatch-fanout", daemon=True)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self.fanout.run(self._stop))
        except Exception:
            log.exception("the notification fanout stopped")
        finally:
            self._loop.close()

    def start(self) -> None:
        """Returns once the socket accepts workers; OSError when it cannot (the error logged)."""
        self._thread.start()
        while not self.fanout.bound.wait(0.05):
            if not self._thread.is_alive():
                raise OSError(f"cannot serve notifications on {self.fanout.path}")

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):  # its loop has ended already
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
