"""The assigner loop: woken by NOTIFY dispatch_work (new or newly available work, freed capacity,
directory changes), it runs assignment batches until nothing more is assignable, then sleeps until
the next notification, the next scheduled task or the tick, whichever comes first. Sleeping agents
that win a task are woken through Warren after the commit, in the background."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from dispatch.broker import Broker
from dispatch.integrations import describe
from dispatch.loop import BackgroundLoop
from dispatch.metrics import Metrics
from dispatch.models import Assignment
from dispatch.notify import WORK_CHANNEL, Listener

log = logging.getLogger(__name__)

WakeFn = Callable[[str], Awaitable[None]]


class Waker:
    """Asks Warren to wake agents, retried with backoff, never on the caller's path. A wake already
    in flight for an agent absorbs further requests for it."""

    def __init__(
        self, wake: WakeFn, *, attempts: int = 5, first_delay: float = 0.2, max_delay: float = 5.0
    ) -> None:
        self._wake = wake
        self._attempts = attempts
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self.woken = 0
        self.failed = 0
        self.last_error: str | None = None

    def request(self, agent_id: str) -> None:
        if agent_id in self._inflight:
            return
        task = asyncio.create_task(self._run(agent_id), name=f"dispatch-wake-{agent_id}")
        self._inflight[agent_id] = task
        task.add_done_callback(lambda _t: self._inflight.pop(agent_id, None))

    async def _run(self, agent_id: str) -> None:
        delay = self._first_delay
        for attempt in range(1, self._attempts + 1):
            try:
                await self._wake(agent_id)
                self.woken += 1
                log.info("woke agent %s", agent_id)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure of the call is retried the same way
                self.last_error = describe(exc)
                log.warning(
                    "waking agent %s failed (attempt %d/%d): %s",
                    agent_id, attempt, self._attempts, self.last_error,
                )
            if attempt < self._attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_delay)
        self.failed += 1
        # The wake timer in the database takes the task back if the agent never starts.

    async def close(self) -> None:
        tasks = list(self._inflight.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


class Assigner(BackgroundLoop):
    """start()/stop(); `batches` counts completed wake-ups and `changed` lets tests await them."""

    task_name = "dispatch-assigner"

    def __init__(
        self,
        broker: Broker,
        listener: Listener | None,
        *,
        metrics: Metrics | None = None,
        waker: Waker | None = None,
        tick_interval_ms: int | None = None,
    ) -> None:
        self.broker = broker
        self.listener = listener
        self.metrics = metrics
        self.waker = waker
        self.tick = (tick_interval_ms or broker.assignment.tick_interval_ms) / 1000.0
        self.batch = broker.assignment.batch_size
        self.rounds = 0  # completed wake-ups (each runs batches until nothing is assignable)
        self.assigned = 0  # tasks assigned by this process
        self.last_error: str | None = None
        self._changed = asyncio.Condition()

    async def _close(self) -> None:
        if self.waker is not None:
            await self.waker.close()

    def health(self) -> dict[str, object]:
        report: dict[str, object] = {"assigner": "ok" if self.last_error is None else "error"}
        if self.waker is not None and self.waker.last_error is not None:
            report["warren_wake"] = f"failing: {self.waker.last_error}"
        return report

    async def wait_until(self, predicate: Callable[[Assigner], bool], timeout: float) -> None:
        """Wait (at most timeout seconds) until predicate(self) holds after a round."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def run_once(self) -> list[Assignment]:
        """Assignment batches until one assigns nothing; returns every assignment made.

        Not "until a batch is short": a batch can end short because the agents it locked filled up
        while tasks for other agents were still waiting further down the queue."""
        made: list[Assignment] = []
        while True:
            batch = await self.broker.assign(batch=self.batch)
            if not batch:
                return made
            if self.metrics is not None:
                self.metrics.assign_batch_size.observe(len(batch))
            for assignment in batch:
                made.append(assignment)
                if self.metrics is not None:
                    self.metrics.assignment_wait.observe(assignment.waited)
                if assignment.wake and self.waker is not None:
                    self.waker.request(assignment.agent_id)

    async def _sleep_for(self) -> float:
        due = await self.broker.store.seconds_until_due()
        if due is None:
            return self.tick
        # A little past the instant, so that `available_at <= now` holds when we look again.
        return min(self.tick, max(due + 0.005, 0.0))

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            woken = self.listener.event(WORK_CHANNEL) if self.listener is not None else None
            try:
                made = await self.run_once()
                timeout = await self._sleep_for()
                self.last_error = None
                backoff = 0.1
            except Exception as exc:  # the loop outlives any failure (database down, pool timeout)
                self.last_error = describe(exc)
                log.warning("assignment failed: %s; retrying in %.1fs", self.last_error, backoff)
                made, timeout = [], backoff
                backoff = min(backoff * 2, self.tick, 5.0)
            self.rounds += 1
            self.assigned += len(made)
            async with self._changed:
                self._changed.notify_all()
            if woken is None:
                await asyncio.sleep(timeout)
            elif not woken.is_set() and timeout > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), timeout)
