"""One hub per process: what the open dashboards show, computed once and sent to all of them.

Each server-sent-event stream subscribes to a topic ("overview", or "task:<id>" for a task's
page). The hub refreshes every topic that has subscribers when the process's Listener hears a
notification (new events, new work), and every tick without one, but at most once per refresh
interval however many notifications arrive; each refresh runs one set of queries per topic and
puts the result in every subscriber's queue. So the database load of the dashboards does not grow
with the number of tabs, and nothing runs while no dashboard is open.

A stream belongs to a sign-in: each refresh also asks which of the open streams' sessions are still
live (one query for all of them) and ends the streams of those that ended (signed out on any
replica, expired, or signed with an admin token that changed).

Topics fail alone: a topic whose queries or templates fail (one task's page) leaves its streams
showing what they had, is logged once per run of failures and tried again at the next refresh,
while every other topic keeps updating.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from dispatch.metrics import Metrics
from dispatch.notify import EVENTS_CHANNEL, SCHEDULES_CHANNEL, WORK_CHANNEL, Listener

log = logging.getLogger(__name__)

# A snapshot replaces the one before it, so a slow client needs only the newest: its queue keeps
# this many and drops the oldest.
QUEUE_SIZE = 2
# While dashboards are open the hub renews the lease that makes event rows NOTIFY
# (Store.ui_notify_keep) this often; the lease lasts twice as long, so it lapses soon after the
# last dashboard closes.
KEEP_EVERY_SECONDS = 20
KEEP_SECONDS = 60

# After a refresh that took t seconds the next waits at least BUSY_FACTOR * t: the dashboards
# take at most 1 / (1 + BUSY_FACTOR) of one connection's time however large the tables grow.
BUSY_FACTOR = 4

# One topic's payload.
Compute = Callable[[str], Awaitable[str]]
# Of these sessions, the live ones.
Alive = Callable[[set[bytes]], Awaitable[set[bytes]]]


class Hub:
    """`compute(topic)` returns the topic's payload; `keep()` renews the notification lease;
    `alive(sessions)` says which of the streams' sessions are live."""

    def __init__(
        self,
        compute: Compute,
        *,
        listener: Listener | None = None,
        keep: Callable[[], Awaitable[None]] | None = None,
        alive: Alive | None = None,
        refresh_seconds: float = 1.0,
        tick_seconds: float = 5.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._compute = compute
        self._metrics = metrics
        self._keep = keep
        self._alive = alive
        self._session_of: dict[asyncio.Queue[str | None], bytes] = {}
        self.refresh_seconds = refresh_seconds
        self.tick_seconds = tick_seconds
        self._topics: dict[str, set[asyncio.Queue[str | None]]] = {}
        self._dirty = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        # Refreshes done (each one set of queries per topic): for tests and the curious.
        self.refreshes = 0
        # Topics whose last refresh failed: logged when they start failing, not at every retry.
        self.failing: set[str] = set()
        if listener is not None:
            # A schedule changed (made, paused, resumed, edited in psql) may fire no event.
            for channel in (EVENTS_CHANNEL, WORK_CHANNEL, SCHEDULES_CHANNEL):
                listener.watch(channel, self._changed)

    @property
    def subscribers(self) -> int:
        return sum(len(queues) for queues in self._topics.values())

    def _changed(self, _payload: str) -> None:
        self._dirty.set()

    def poke(self) -> None:
        """Refresh soon (a sign-out here: its streams end at once)."""
        self._dirty.set()

    @contextlib.asynccontextmanager
    async def subscribe(
        self, topic: str, session: bytes | None = None
    ) -> AsyncIterator[asyncio.Queue[str | None]]:
        """A queue that receives the topic's payloads, and None when the hub closes or the
        `session` the stream was opened with ends."""
        queue: asyncio.Queue[str | None] = asyncio.Queue(QUEUE_SIZE)
        if self._closed:
            queue.put_nowait(None)
            yield queue
            return
        self._topics.setdefault(topic, set()).add(queue)
        if session is not None:
            self._session_of[queue] = session
        if self._metrics is not None:
            self._metrics.ui_streams.inc()
        # The page it came from was rendered a moment ago: a refresh soon covers what changed
        # since (subscribers arriving together share it).
        self._dirty.set()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="dispatch-ui-hub")
        try:
            yield queue
        finally:
            if self._metrics is not None:
                self._metrics.ui_streams.dec()
            self._session_of.pop(queue, None)
            queues = self._topics.get(topic)
            if queues is not None:
                queues.discard(queue)
                if not queues:
                    del self._topics[topic]
                    self.failing.discard(topic)

    async def close(self) -> None:
        """End every stream (server shutdown: uvicorn waits for open responses)."""
        self._closed = True
        for queues in self._topics.values():
            for queue in queues:
                _offer(queue, None)
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        keep_due = 0.0
        while self._topics and not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self.tick_seconds)
            self._dirty.clear()
            topics = list(self._topics)
            if not topics:
                break
            started = loop.time()
            if self._keep is not None and loop.time() >= keep_due:
                try:
                    await self._keep()
                    keep_due = loop.time() + KEEP_EVERY_SECONDS
                except Exception:
                    # Without the lease, event rows stop notifying: the ticks still refresh.
                    log.warning("dashboard notification lease not renewed", exc_info=True)
            await self._end_signed_out()
            for topic in list(self._topics):
                await self._refresh(topic)
            self.refreshes += 1
            if self._metrics is not None:
                self._metrics.ui_refreshes.inc()
            # Notifications that arrive meanwhile only set _dirty: one refresh covers them all.
            # A refresh that took long (the queue counts read every row of a long history) spaces
            # out the next ones, so open dashboards never keep the database busy.
            elapsed = loop.time() - started
            await asyncio.sleep(max(self.refresh_seconds, BUSY_FACTOR * elapsed))

    async def _end_signed_out(self) -> None:
        """End the streams whose session is no longer live."""
        if self._alive is None or not self._session_of:
            return
        try:
            live = await self._alive(set(self._session_of.values()))
        except Exception:
            # Checked again at the next refresh.
            log.warning("dashboard sessions not checked", exc_info=True)
            return
        for queue, session in list(self._session_of.items()):
            if session not in live:
                del self._session_of[queue]
                for queues in self._topics.values():
                    queues.discard(queue)
                _offer(queue, None)
        for topic in [t for t, queues in self._topics.items() if not queues]:
            del self._topics[topic]
            self.failing.discard(topic)

    async def _refresh(self, topic: str) -> None:
        """Compute one topic and send it to its streams; a failure stays with that topic."""
        try:
            payload = await self._compute(topic)
        except Exception:
            # The database is away or busy, or this topic's data does not render: its streams
            # keep what they show, the other topics go on, and the next refresh tries again.
            if self._metrics is not None:
                self._metrics.ui_topic_failures.inc()
            if topic not in self.failing:
                self.failing.add(topic)
                log.warning("dashboard topic %s failed; retrying at each refresh", topic,
                            exc_info=True)
            return
        if topic in self.failing:
            self.failing.discard(topic)
            log.info("dashboard topic %s recovered", topic)
        for queue in self._topics.get(topic, ()):
            _offer(queue, payload)


def _offer(queue: asyncio.Queue[str | None], item: str | None) -> None:
    """Put without waiting: a full queue (a client that does not read) loses its oldest item."""
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(item)
