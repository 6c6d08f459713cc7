"""What the assigner and the reaper share: the tick, and sleeping until the next thing is due."""

from __future__ import annotations

from dispatch.broker import Broker
from dispatch.loop import BackgroundLoop
from dispatch.notify import Listener
from dispatch.store.tasks import DueKind


class TickLoop(BackgroundLoop):
    """A loop that wakes for the next deadline or scheduled task (by the database's clock), and
    at least every tick (assignment.tick_interval_ms unless given)."""

    due: DueKind = "all"  # what the loop has to do next: see Tasks.seconds_until_due

    def __init__(
        self, broker: Broker, listener: Listener | None, *, tick_interval_ms: int | None = None
    ) -> None:
        tick = (tick_interval_ms or broker.assignment.tick_interval_ms) / 1000.0
        super().__init__(interval=tick, backoff=(0.1, min(tick, 5.0)))
        self.broker = broker
        self.listener = listener

    async def until_due(self) -> float:
        """Seconds to sleep: a little past the next due instant, so that `available_at <= now`
        holds when the loop looks again; never longer than the tick."""
        return self.sleep_for(await self.broker.tasks.seconds_until_due(self.due))

    def sleep_for(self, due: float | None) -> float:
        """Seconds to sleep for a due instant `due` seconds away (None: nothing is due)."""
        if due is None:
            return self.interval
        return min(self.interval, max(due + 0.005, 0.0))
