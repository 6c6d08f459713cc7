"""The pruner loop: retention, one replica at a time (advisory lock). The event history is
partitioned by time: each round creates the partitions ahead of the clock, drops those past
retention whole, then deletes the terminal tasks finished before retention in small batches (their
history goes with its partition, at most one partition width later)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from dispatch.broker import Broker
from dispatch.loop import BackgroundLoop

log = logging.getLogger(__name__)

PRUNE_LOCK_KEY = 0x44495301  # any constant shared by every replica
PRUNE_BATCH = 1000
# A batch deletes up to PRUNE_BATCH tasks; on a large or cold table that may take longer than the
# bound of an API statement (database.statement_timeout_ms), so each batch runs with this one
# instead. Lock waits keep the pool's bound (and the batch skips locked rows).
PRUNE_STATEMENT_TIMEOUT_MS = 300_000
# History partitions are the widest of these that fits four times into the retention, so about
# four partitions hold the retained history and one more is dropped each width.
WIDTHS = tuple(
    timedelta(minutes=m)
    for m in (1, 5, 15, 30, 60, 120, 180, 240, 360, 480, 720, 1440)
)
# Partitions are created this many widths (and pruner intervals) ahead of the clock.
AHEAD = 3


def partition_width(retention: timedelta) -> timedelta:
    fitting = [w for w in WIDTHS if w * 4 <= retention]
    return fitting[-1] if fitting else WIDTHS[0]


class Pruner(BackgroundLoop):
    """`pruned` counts the tasks this process deleted, `partitions_created` and
    `partitions_dropped` the history partitions."""

    name = "pruner"

    def __init__(
        self, broker: Broker, *, retention_hours: float, interval_seconds: float = 60.0
    ) -> None:
        super().__init__(interval=interval_seconds)
        self.tasks = broker.tasks
        self.retention = timedelta(hours=retention_hours)
        self.width = partition_width(self.retention)
        self.ahead = AHEAD * (self.width + timedelta(seconds=interval_seconds))
        self.pruned = 0
        self.partitions_created = 0
        self.partitions_dropped = 0
        self.history = "ok"  # or what is wrong with the history's partitions (health "history")

    async def run_once(self, now: datetime | None = None) -> int | None:
        """Prune once; the number of tasks deleted, None when another replica holds the lock."""
        now = now or datetime.now(UTC)
        before = now - self.retention
        async with self.tasks.exclusive(PRUNE_LOCK_KEY) as mine:
            if not mine:
                return None
            await self._keep_history(now, before)
            total = 0
            while True:
                async with self.tasks.maintenance(PRUNE_STATEMENT_TIMEOUT_MS) as conn:
                    n = await self.tasks.prune(before, PRUNE_BATCH, conn=conn)
                total += n
                if n < PRUNE_BATCH:
                    break
        if total:
            log.info("pruned %d terminal tasks finished before %s", total, before.isoformat())
        self.pruned += total
        return total

    async def start(self) -> None:
        """Prepare the history's partitions before the first request can write an event (the
        rounds then keep them), so that a new database never starts writing into the default
        partition."""
        try:
            async with self.tasks.exclusive(PRUNE_LOCK_KEY) as mine:
                if mine:
                    await self._prepare(datetime.now(UTC))
        except Exception as exc:  # the rounds report it (and retry)
            log.warning("preparing the history's partitions at start failed: %s", exc)
        await super().start()

    async def _prepare(self, now: datetime) -> None:
        async with self.tasks.maintenance(PRUNE_STATEMENT_TIMEOUT_MS) as conn:
            self.partitions_created += await self.tasks.history_prepare(
                now, now + self.ahead, self.width, conn=conn
            )

    async def _keep_history(self, now: datetime, before: datetime) -> None:
        # Each step is its own short transaction: a drop holds the events table's exclusive lock
        # until its transaction ends.
        await self._prepare(now)
        async with self.tasks.transaction() as conn:
            self.partitions_dropped += await self.tasks.history_drop(before, conn=conn)
        state = await self.tasks.history_state(before, self.width)
        problems = []
        if state["overdue"]:
            problems.append(
                f"{state['overdue']} partitions past retention not dropped (a long transaction on"
                " dispatch.task_events holds their lock; retried each round)"
            )
        if state["unplaced"]:
            problems.append(f"{state['unplaced']} rows in dispatch.task_events_default")
        if state["until"] is None or state["until"] < now + self.width:
            problems.append(
                f"no partition beyond {state['until']}: new events go to"
                " dispatch.task_events_default until one is created"
            )
        for problem in problems:
            if problem not in self.history:
                log.warning("event history: %s", problem)
        self.history = "; ".join(problems) or "ok"

    def health(self) -> dict[str, object]:
        return {**super().health(), "history": self.history}
