"""The reaper loop: ends overdue attempts (deadline, heartbeat, wake timeout) through
dispatch.task_expire, sleeping until the next known deadline and never longer than the tick; and
reports pending tasks no agent could take (`unmatched`: once, again after unmatched_repeat_ms).

A deadline set after the reaper went to sleep (by this replica or another) arrives on the
dispatch_due channel; when it is nearer than the wake-up the reaper planned, it wakes early."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from dispatch.broker import Broker
from dispatch.integrations import describe
from dispatch.loop import BackgroundLoop
from dispatch.models import Expiry
from dispatch.notify import DUE_CHANNEL, Listener

log = logging.getLogger(__name__)

EXPIRE_BATCH = 100


class Reaper(BackgroundLoop):
    """start()/stop(); `rounds` counts passes and `changed` lets tests await them."""

    task_name = "dispatch-reaper"

    def __init__(
        self,
        broker: Broker,
        listener: Listener | None = None,
        *,
        tick_interval_ms: int | None = None,
    ) -> None:
        self.broker = broker
        self.listener = listener
        self.tick = (tick_interval_ms or broker.assignment.tick_interval_ms) / 1000.0
        self.rounds = 0
        self.expired = 0
        self.unmatched = 0
        self.last_error: str | None = None
        self._last_unmatched = float("-inf")
        self._changed = asyncio.Condition()
        self._sleep_until = float("inf")  # wall-clock epoch of the planned wake-up
        self._nearer = asyncio.Event()
        if listener is not None:
            listener.watch(DUE_CHANNEL, self._on_due)

    def _on_due(self, payload: str) -> None:
        """A new deadline: wake now if it comes before the planned wake-up (or if unknown)."""
        try:
            due = float(payload)
        except ValueError:
            due = float("-inf")  # a reconnect: notifications may have been missed
        if due < self._sleep_until:
            self._nearer.set()

    def health(self) -> dict[str, object]:
        return {"reaper": "ok" if self.last_error is None else "error"}

    async def wait_until(self, predicate: Callable[[Reaper], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def run_once(self) -> list[Expiry]:
        """Expire everything overdue now; report unmatched tasks at most once per tick."""
        ended: list[Expiry] = []
        while True:
            batch = await self.broker.expire(limit=EXPIRE_BATCH)
            ended.extend(batch)
            if len(batch) < EXPIRE_BATCH:
                break
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_unmatched >= self.tick:
            self._last_unmatched = loop.time()
            self.unmatched += await self.broker.store.task_report_unmatched()
        return ended

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                ended = await self.run_once()
                self.expired += len(ended)
                due = await self.broker.store.seconds_until_due()
                delay = self.tick if due is None else min(self.tick, max(due + 0.005, 0.0))
                self.last_error = None
                backoff = 0.1
            except Exception as exc:  # the loop outlives any failure (database down, pool timeout)
                self.last_error = describe(exc)
                log.warning("reaper failed: %s; retrying in %.1fs", self.last_error, backoff)
                delay = backoff
                backoff = min(backoff * 2, self.tick, 5.0)
            self.rounds += 1
            async with self._changed:
                self._changed.notify_all()
            await self._sleep(delay)

    async def _sleep(self, delay: float) -> None:
        self._nearer.clear()
        self._sleep_until = time.time() + delay
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nearer.wait(), delay)
        finally:
            self._sleep_until = float("inf")
