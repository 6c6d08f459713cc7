"""The one shape of every background loop (the engine's and the event relay)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Self

from dispatch.integrations import describe

log = logging.getLogger(__name__)


async def cancel_task(task: asyncio.Task[None] | None) -> None:
    """Cancel `task` (if any) and wait until it has ended."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class BackgroundLoop:
    """start() runs rounds until stop(). A round is `round()` (by default `run_once()`, then
    `interval` seconds of sleep); a round that raises is logged, kept in `last_error` (health
    "error") and followed by a backoff that doubles from `backoff[0]` up to `backoff[1]`.
    `rounds` counts rounds; tests await `wait_until(predicate, timeout)` instead of sleeping.

    Subclasses implement run_once() and, where they have one, their sleep and wake policy:
    `arm()` (take wake-up events before the round looks at the database), `round()` (how long
    to sleep after it), `sleep()` (what cuts the sleep short)."""

    name = "loop"

    def __init__(self, *, interval: float, backoff: tuple[float, float] | None = None) -> None:
        self.interval = interval
        self.backoff = backoff or (interval, interval)
        self.rounds = 0
        self.last_error: str | None = None
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> object:
        raise NotImplementedError

    async def round(self) -> float:
        """One round; returns the seconds to sleep before the next."""
        await self.run_once()
        return self.interval

    def arm(self) -> None:
        """Called before each round."""

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def sleep_after_failure(self, seconds: float) -> None:
        await self.sleep(seconds)

    def failed(self, exc: Exception, retry_in: float) -> str:
        """Log a failed round; returns the reason kept in last_error."""
        reason = describe(exc)
        log.warning("%s failed: %s; retrying in %.1fs", self.name, reason, retry_in)
        return reason

    def progressed(self) -> None:
        """A long round calls this when a step of it worked: health is "ok" again now, not only
        once the whole round is done."""
        self.last_error = None

    def health(self) -> dict[str, object]:
        return {self.name: "ok" if self.last_error is None else "error"}

    async def wait_until(self, predicate: Callable[[Self], bool], timeout: float) -> None:
        """Wait (at most timeout seconds) until predicate(self) holds after a round."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"dispatch-{self.name}")

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None
        await self._close()

    async def _close(self) -> None:
        """Release what the loop holds (clients, connections) after it has stopped."""

    async def _run(self) -> None:
        first, most = self.backoff
        backoff = first
        while True:
            self.arm()
            failed = False
            try:
                delay = await self.round()
                self.last_error = None
                backoff = first
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loop outlives any failure (database down, a bug)
                self.last_error = self.failed(exc, backoff)
                delay, failed = backoff, True
                backoff = min(backoff * 2, most)
            self.rounds += 1
            async with self._changed:
                self._changed.notify_all()
            if failed:
                await self.sleep_after_failure(delay)
            else:
                await self.sleep(delay)

