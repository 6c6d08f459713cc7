"""The assigner loop: woken by NOTIFY dispatch_work (new or newly available work, freed capacity,
directory changes), it runs assignment batches until nothing more is assignable, then sleeps until
the next notification, the next scheduled task or the tick, whichever comes first. Sleeping agents
that win a task are woken through Warren after the commit, in the background.

When its last round found work waiting and no agent with room for any of it, the wake-ups of new
tasks alone (dispatch_work with payload `created`) do not start another round: nothing can take
them until room is freed, and whatever frees room (a task ending or given back, a registration,
heartbeat, undrain or directory change) sends dispatch_work with another payload. A deep backlog
behind busy agents then costs no round per new task. The tick still runs one.

A rate limit that held a task back announces on dispatch_due when its bucket will have refilled;
the assigner of every replica wakes then instead of at the next tick."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from dispatch.broker import Broker
from dispatch.engine.tick import TickLoop
from dispatch.integrations import describe
from dispatch.metrics import Metrics
from dispatch.models import Assignment
from dispatch.notify import (
    ASSIGNER_WAKE,
    CREATED,
    DUE_CHANNEL,
    WORK_CHANNEL,
    Listener,
    due_epoch,
)

log = logging.getLogger(__name__)

WakeFn = Callable[[str], Awaitable[None]]

# How long a round that lost its picks to claims holding their agents' slots waits before the
# next (a claim's statement lasts a millisecond or two); then the tick.
LOST_PAUSES = (0.002, 0.005, 0.01, 0.02, 0.05)


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


class Assigner(TickLoop):
    """The push side of assignment; `assigned` counts the tasks this process assigned, `passed`
    the wake-ups it let pass (new tasks while every agent was full)."""

    name = "assigner"

    def __init__(
        self,
        broker: Broker,
        listener: Listener | None,
        *,
        metrics: Metrics | None = None,
        waker: Waker | None = None,
        tick_interval_ms: int | None = None,
    ) -> None:
        super().__init__(broker, listener, tick_interval_ms=tick_interval_ms)
        self.metrics = metrics
        self.waker = waker
        self.batch = broker.assignment.batch_size
        self.assigned = 0
        self.passed = 0
        self._woken: asyncio.Event | None = None
        self._full = False  # the last round found work waiting and no agent with room
        self._room = 0  # dispatch_work heard that may have freed room (all but new tasks')
        self._room_armed = 0  # _room when the last round began
        self._due = float("inf")  # wall-clock epoch of the nearest refill announced
        self._next: float | None = None  # seconds to the next deferred task, as of the last batch
        self._nearer = asyncio.Event()
        if listener is not None:
            listener.watch(DUE_CHANNEL, self._on_due)
            listener.watch(WORK_CHANNEL, self._on_work)

    def _on_work(self, payload: str) -> None:
        if payload != CREATED:
            self._room += 1

    async def start(self) -> None:
        await super().start()
        if self.listener is not None:
            # The work this process makes wakes an assigner of this `serve` without a NOTIFY
            # (Listener.announce): one assigner hearing of it is enough to give it to any agent.
            self.broker.announce = self.listener.announce

    async def stop(self) -> None:
        if self.listener is not None and self.broker.announce == self.listener.announce:
            self.broker.announce = None
        await super().stop()

    def _on_due(self, payload: str) -> None:
        due = due_epoch(payload)
        # None: a reconnect, for which the work channel wakes the assigner.
        if due is not None and due < self._due:
            self._due = due
            self._nearer.set()

    async def _close(self) -> None:
        if self.waker is not None:
            await self.waker.close()

    def health(self) -> dict[str, object]:
        report = super().health()
        if self.waker is not None and self.waker.last_error is not None:
            report["warren_wake"] = f"failing: {self.waker.last_error}"
        return report

    async def run_once(self) -> list[Assignment]:
        """Assignment batches until one assigns nothing or says there is no more to give now;
        returns every assignment made.

        Not "until a batch is short": a batch can end short because the agents it locked filled up
        while tasks for other agents were still waiting further down the queue (its `more`)."""
        made: list[Assignment] = []
        retries = 0
        while True:
            batch, self._next, self._full, lost = await self.broker.assign_round(
                batch=self.batch)
            self.progressed()
            if not batch:
                # A task it picked went to no one: a claim of the agent it chose held that
                # agent's free slot, and (finding the task locked by this round) may have taken
                # nothing. Nothing else announces that task: look again once the claim has
                # ended, a few times, each a little later.
                if not lost or retries == len(LOST_PAUSES):
                    return made
                await asyncio.sleep(LOST_PAUSES[retries])
                retries += 1
                continue
            if self.metrics is not None:
                self.metrics.assign_batch_size.observe(len(batch))
            for assignment in batch:
                made.append(assignment)
                if self.metrics is not None:
                    self.metrics.waited(assignment.capabilities, assignment.waited)
                if assignment.wake and self.waker is not None:
                    self.waker.request(assignment.agent_id)
            if not batch[0].more:
                return made

    def arm(self) -> None:
        # dispatch_work, when this process's assigner is the one it wakes (see Listener).
        self._woken = self.listener.event(ASSIGNER_WAKE) if self.listener is not None else None
        self._room_armed = self._room

    def _only_created(self) -> bool:
        """Woken by new tasks alone since a round that found every agent full."""
        return self._full and self._room == self._room_armed

    async def round(self) -> float:
        self.assigned += len(await self.run_once())
        return self.sleep_for(self._next)  # read by the last batch's own statement

    async def sleep(self, seconds: float) -> None:
        """Until the next NOTIFY dispatch_work (when it wakes this assigner) that may find work
        to give, an announced refill, or seconds."""
        woken = self._woken
        if woken is None:
            await asyncio.sleep(seconds)
            return
        until = time.time() + seconds
        while not woken.is_set() or self._only_created():
            if woken.is_set():  # new tasks, and no agent has room for them: sleep on
                self.passed += 1
                self.arm()
                woken = self._woken
                assert woken is not None
            # A little past the refill, so that the bucket holds the tokens when we look.
            left = min(until, self._due + 0.005) - time.time()
            if left <= 0:
                break
            self._nearer.clear()
            waits = [asyncio.ensure_future(woken.wait()),
                     asyncio.ensure_future(self._nearer.wait())]
            try:
                await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        if self._due <= time.time():
            self._due = float("inf")
