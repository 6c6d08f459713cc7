"""The scheduler loop: makes the tasks of due schedules (dispatch/sql/schema/15_schedules.sql).

Every replica runs one. A round locks the due schedules with SKIP LOCKED, reads their fires by
the database's clock (dispatch/cron.py) and records them with dispatch.schedule_fire in the same
transaction, so a fire makes one task whichever replica gets there, and none is lost when a
replica dies mid-round: its transaction rolls back and another takes the row. Between rounds it
sleeps until the next fire (by the database's clock), at most a tick, and wakes early on
dispatch_schedules (a schedule made, changed or resumed anywhere)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime

from dispatch.broker import Broker
from dispatch.cron import Cron
from dispatch.errors import DispatchError, InvalidInput
from dispatch.loop import BackgroundLoop
from dispatch.models import Schedule
from dispatch.notify import SCHEDULES_CHANNEL, Listener
from dispatch.store import Conn

log = logging.getLogger(__name__)

BATCH = 50
# A due schedule another replica holds is looked at again this soon (it may have died holding it).
RETRY_HELD = 0.25


class Scheduler(BackgroundLoop):
    """`fired` counts the tasks this process made from schedules."""

    name = "scheduler"

    def __init__(
        self, broker: Broker, listener: Listener | None = None, *,
        tick_interval_ms: int | None = None,
    ) -> None:
        tick = (tick_interval_ms or broker.assignment.tick_interval_ms) / 1000.0
        super().__init__(interval=tick, backoff=(0.1, min(tick, 5.0)))
        self.broker = broker
        self.schedules = broker.schedules
        self.fired = 0
        self._changed_elsewhere = asyncio.Event()
        if listener is not None:
            listener.watch(SCHEDULES_CHANNEL, lambda _payload: self._changed_elsewhere.set())

    async def run_once(self, now: datetime | None = None) -> int:
        """Make every due schedule's tasks; returns how many. `now` is an injected clock (None:
        the database's)."""
        made = 0
        while True:
            async with self.schedules.transaction() as conn:
                at = now or await self.schedules.now(conn=conn)
                due = await self.schedules.lock_due(at, BATCH, conn=conn)
                for schedule in due:
                    made += await self._fire(schedule.name, schedule, at, conn)
            if len(due) < BATCH:
                return made

    async def _fire(self, name: str, schedule: Schedule, now: datetime, conn: Conn) -> int:
        try:
            cron = Cron(schedule.cron, schedule.timezone)
        except InvalidInput as exc:
            log.warning("schedule %s paused: %s", name, exc)
            await self.schedules.broken(name, str(exc), conn=conn)
            return 0
        if schedule.next_fire_at is None:  # new, changed or resumed: fires from now on
            await self.schedules.set_next(name, cron.next_after(now), conn=conn)
            return 0
        due = cron.due(schedule.next_fire_at, now, schedule.catch_up, schedule.catch_up_limit)
        try:
            async with conn.transaction():
                ids = await self.schedules.fire(
                    name, due.fires, due.next_fire_at, due.missed, conn=conn
                )
        except DispatchError as exc:  # the template is refused now (a DBA's edit, a gone parent)
            log.warning("schedule %s paused: its task is refused: %s", name, exc)
            await self.schedules.broken(name, f"the task is refused: {exc}", conn=conn)
            return 0
        return len(ids)

    async def round(self) -> float:
        self._changed_elsewhere.clear()
        self.fired += await self.run_once()
        return await self.until_due()

    async def until_due(self) -> float:
        """Seconds until the next fire by the database's clock, at most a tick; soon when a due
        schedule was held by another replica."""
        seconds = await self.schedules.seconds_until_due()
        if seconds is None:
            return self.interval
        if seconds <= 0:
            return RETRY_HELD
        return min(self.interval, seconds + 0.005)

    async def sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed_elsewhere.wait(), seconds)
