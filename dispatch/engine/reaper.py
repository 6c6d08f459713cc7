"""The reaper loop: ends overdue attempts (deadline, heartbeat, wake timeout) through
dispatch.task_expire, sleeping until the next known deadline and never longer than the tick; parks
pending tasks no agent of the directory could take, out of the walk; and reports pending tasks no
agent could take now (`unmatched`: once, again after unmatched_repeat_ms).

A deadline set after the reaper went to sleep (by this replica or another) arrives on the
dispatch_due channel; when it is nearer than the wake-up the reaper planned, it wakes early."""

from __future__ import annotations

import asyncio
import contextlib
import time

from dispatch.broker import Broker
from dispatch.engine.tick import TickLoop
from dispatch.models import Expiry
from dispatch.notify import DUE_CHANNEL, Listener, due_epoch

EXPIRE_BATCH = 100


class Reaper(TickLoop):
    """`expired` and `unmatched` count what this process reaped and reported."""

    name = "reaper"
    due = "deadline"

    def __init__(
        self,
        broker: Broker,
        listener: Listener | None = None,
        *,
        tick_interval_ms: int | None = None,
    ) -> None:
        super().__init__(broker, listener, tick_interval_ms=tick_interval_ms)
        self.expired = 0
        self.unmatched = 0
        self._last_unmatched = float("-inf")
        self._sleep_until = float("inf")  # wall-clock epoch of the planned wake-up
        self._nearer = asyncio.Event()
        if listener is not None:
            listener.watch(DUE_CHANNEL, self._on_due)

    def _on_due(self, payload: str) -> None:
        """A new deadline: wake now if it comes before the planned wake-up (or if unknown)."""
        due = due_epoch(payload)
        if due is None or due < self._sleep_until:
            self._nearer.set()

    async def run_once(self) -> list[Expiry]:
        """Expire everything overdue now; park and report unmatched tasks at most once per
        tick."""
        ended: list[Expiry] = []
        while True:
            batch = await self.broker.expire(limit=EXPIRE_BATCH)
            ended.extend(batch)
            if len(batch) < EXPIRE_BATCH:
                break
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_unmatched >= self.interval:
            self._last_unmatched = loop.time()
            # Two transactions: the report holds no task a claim could want while it writes.
            await self.broker.tasks.park_unmatched()
            self.unmatched += await self.broker.tasks.report_unmatched()
        return ended

    async def round(self) -> float:
        self.expired += len(await self.run_once())
        return await self.until_due()

    async def sleep(self, seconds: float) -> None:
        """Until the planned wake-up, or a nearer deadline on dispatch_due."""
        self._nearer.clear()
        self._sleep_until = time.time() + seconds
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nearer.wait(), seconds)
        finally:
            self._sleep_until = float("inf")
