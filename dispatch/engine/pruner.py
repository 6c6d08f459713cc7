"""The pruner loop: deletes terminal tasks (and their events) older than the retention period, one
replica at a time (advisory lock), in small batches so it never holds many locks."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from dispatch.broker import Broker
from dispatch.loop import BackgroundLoop

log = logging.getLogger(__name__)

PRUNE_LOCK_KEY = 0x44495301  # any constant shared by every replica
PRUNE_BATCH = 1000
# A batch deletes up to PRUNE_BATCH tasks with their events; on a large or cold table that may take
# longer than the bound of an API statement (database.statement_timeout_ms), so each batch runs
# with this one instead. Lock waits keep the pool's bound (and the batch skips locked rows).
PRUNE_STATEMENT_TIMEOUT_MS = 300_000


class Pruner(BackgroundLoop):
    """`pruned` counts the tasks this process deleted."""

    name = "pruner"

    def __init__(
        self, broker: Broker, *, retention_hours: int, interval_seconds: float = 60.0
    ) -> None:
        super().__init__(interval=interval_seconds)
        self.tasks = broker.tasks
        self.retention = timedelta(hours=retention_hours)
        self.pruned = 0

    async def run_once(self, now: datetime | None = None) -> int | None:
        """Prune once; None when another replica holds the lock."""
        before = (now or datetime.now(UTC)) - self.retention
        async with self.tasks.exclusive(PRUNE_LOCK_KEY) as mine:
            if not mine:
                return None
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
