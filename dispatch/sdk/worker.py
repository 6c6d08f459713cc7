"""The worker SDK: an agent in ten lines.

    from dispatch.sdk.worker import TaskContext, Worker

    worker = Worker("http://localhost:8600", "summariser-1", capabilities=["summarise"])

    @worker.handler
    async def summarise(ctx: TaskContext) -> object:
        await ctx.progress(50, "reading")
        return {"summary": ctx.task.description[:200]}

    worker.run()

The worker registers its agent, claims tasks (a long poll, several at once, started in the same
step; the claim returns the tasks the assigner pushed to it first), runs the handler once per task,
completes the task with what the handler returns or fails it with what it raises (retryable, unless
it raises Permanent), and presents the task's lease with every report so it never reports on an
attempt it no longer holds. A thread with its own HTTP client keeps the leases alive and watches for
cancellation, so a handler that blocks the event loop keeps its task, and one whose task was
cancelled, timed out or given to someone else is cancelled. A result the broker refuses (too
large, say) or that is not JSON (NaN, an object) fails the task, not retryable, with the reason:
the attempt always ends with an outcome instead of waiting out its timeout to run again. On
SIGTERM (or SIGINT) it stops claiming, lets running handlers finish within `grace_seconds`, then
releases the rest: pending again, with no attempt counted (POST /tasks/{id}/release).
With `claim=False` it takes only what the assigner pushes, looking for it now and then; with
`nats_url` (push mode, nats-py) too, the relay's `swarm.dispatch.agent.<id>.assigned` tells it at
once that the assigner gave it a task. When the application has configured an OpenTelemetry tracer
provider, each task's handler and reports are a span in the task's trace (dispatch.sdk.tracing).

Imports only httpx and msgspec (the client install; nats-py in push mode): no server dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import httpx
import msgspec

from dispatch.errors import Conflict, DispatchError, Forbidden, NotFound, Unavailable
from dispatch.models import Dependencies, NextClaim, Task, TaskStatus, TaskWithNext
from dispatch.sdk import tracing
from dispatch.sdk.client import AsyncDispatchClient, DispatchClient, report_item, report_outcome
from dispatch.wire import MAX_REPORTS

log = logging.getLogger("dispatch.worker")
T = TypeVar("T")
_Send = Callable[[], Awaitable["TaskWithNext"]]

# Reports that say the worker no longer holds the attempt: cancelled, timed out, reassigned (409),
# or the task is not ours (403) or gone (404).
LOST = (Conflict, Forbidden, NotFound)
# The longest error the worker reports, in characters (the broker takes up to 65,536): the
# handler's message, or an exception with the end of its traceback; a longer one is cut.
ERROR_LIMIT = 4000
# A report the broker could not take for the moment (network, 5xx, 429) is sent again after these
# pauses; one it refuses (another 4xx) is not: the same report would be refused again.
RESEND_SECONDS = (0.5, 1.0, 2.0, 4.0, 8.0)
# PostgreSQL text (and jsonb strings) cannot hold NUL: errors and command output carry this instead.
NUL_REPLACEMENT = "\ufffd"


class TaskError(Exception):
    """Raised by a handler: fail the task with exactly this message (no traceback); retryable."""

    retryable = True


class Permanent(TaskError):
    """Raised by a handler: fail the task without a retry (it would fail the same way again)."""

    retryable = False


class WaitForSignal(Exception):
    """Raised by a handler: set the task aside until a signal comes, without holding a slot.
    The signal's payload is then on the task (`task.signal`) and the handler runs again from
    the start with it, on this worker when it can take it; no signal within timeout_seconds
    fails the attempt."""

    def __init__(self, waiting_for: str, timeout_seconds: int) -> None:
        super().__init__(waiting_for)
        self.waiting_for = waiting_for
        self.timeout_seconds = timeout_seconds


class TaskLost(Exception):
    """The worker no longer holds this attempt; raised by TaskContext.progress, and the reason
    the handler was cancelled."""


@dataclass
class _Attempt:
    """One task this worker is running: the handler's asyncio task, and what the keeper thread
    needs to keep its lease alive (read and written under Worker._lock)."""

    task: Task
    started: float
    job: asyncio.Task[None] | None = None  # _run: the handler, then the report
    runner: asyncio.Task[object] | None = None  # the handler itself
    progress: dict[str, object] = field(default_factory=dict)
    last_beat: float = 0.0
    lost: str | None = None


class TaskContext:
    """What a handler gets: the task, its metadata, progress reports and cancellation."""

    def __init__(self, worker: Worker, attempt: _Attempt) -> None:
        self._worker = worker
        self._attempt = attempt

    @property
    def task(self) -> Task:
        return self._attempt.task

    @property
    def task_id(self) -> uuid.UUID:
        return self._attempt.task.task_id

    @property
    def metadata(self) -> dict[str, object]:
        return self._attempt.task.metadata

    @property
    def lease(self) -> int:
        return self._attempt.task.lease

    async def dependencies(self) -> Dependencies:
        """What the task depended on, with each one's status, result and error (one call)."""
        return await self._worker._client.dependencies(self.task_id)

    @property
    def cancelled(self) -> bool:
        """True once the worker knows it no longer holds the task (the handler is cancelled too)."""
        return self._attempt.lost is not None

    async def progress(self, percent: float | None = None, message: str | None = None,
                       data: object = None) -> None:
        """Report progress; raises TaskLost when the task was cancelled or taken away, and
        InvalidInput for a bad report (percent over 100); one the network lost is only logged."""
        report = {k: v for k, v in (("percent", percent), ("message", message), ("data", data))
                  if v is not None}
        with self._worker._lock:
            self._attempt.progress = report
            self._attempt.last_beat = time.monotonic()
        try:
            await self._worker._client.progress(
                self.task_id, percent, message, data, lease=self.lease
            )
        except LOST as exc:
            self._worker._lose(self._attempt, exc.message)
            raise TaskLost(exc.message) from None
        except (Unavailable, httpx.HTTPError) as exc:
            # Progress is advice: a report lost to the network does not fail the work (the
            # keeper repeats it while the task has a heartbeat).
            log.warning("task %s: progress not reported: %s", self.task_id, exc)


Handler = Callable[[TaskContext], Coroutine[object, object, object]]


class _Closable(Protocol):
    async def close(self) -> None: ...


class _Reports:
    """Completions and failures on their way to the broker. One goes at once, alone (its own
    request); those that become ready while a report is in flight leave together once it is
    back: one request and one transaction for all of them (POST /tasks/reports), whose `next`
    claims a task for each slot they free. A batch the broker refuses as a whole (its size, say)
    is sent again one report at a time, so that each gets its own answer."""

    def __init__(self, client: AsyncDispatchClient, then: Callable[[], NextClaim | None]) -> None:
        self._client = client
        self._then = then
        self._busy = False
        self._waiting: list[tuple[dict[str, object], _Send, asyncio.Future[TaskWithNext]]] = []
        self.batches = 0  # requests that carried more than one report
        self._jobs: set[asyncio.Task[None]] = set()

    async def send(self, item: dict[str, object], alone: _Send) -> TaskWithNext:
        """Deliver one report: `item` its form in a batch, `alone` its own request."""
        if self._busy:
            done = asyncio.get_running_loop().create_future()
            self._waiting.append((item, alone, done))
            return await done
        self._busy = True
        try:
            return await alone()
        finally:
            self._release()

    def _release(self) -> None:
        waiting, self._waiting = self._waiting[:MAX_REPORTS], self._waiting[MAX_REPORTS:]
        if not waiting:
            self._busy = False
            return
        job = asyncio.get_running_loop().create_task(self._together(waiting))
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _together(
        self, waiting: list[tuple[dict[str, object], _Send, asyncio.Future[TaskWithNext]]]
    ) -> None:
        try:
            if len(waiting) == 1:
                await _settle(waiting[0][2], waiting[0][1])
                return
            items = [item for item, _, _ in waiting]
            then = self._then()
            if then is not None:
                items[-1] = {**items[-1], "next": msgspec.to_builtins(
                    NextClaim(max_tasks=len(items), start=then.start))}
            self.batches += 1
            try:
                outcomes = await self._client.reports(items)
            except DispatchError as exc:
                if not 400 <= getattr(exc, "status", 0) < 500:
                    raise
                log.info("a batch of %d reports refused (%s): sent one by one", len(items), exc)
                for _, alone, done in waiting:
                    await _settle(done, alone)
                return
            for (_, _, done), outcome in zip(waiting, outcomes, strict=True):
                try:
                    _resolve(done, report_outcome(outcome))
                except DispatchError as exc:
                    _resolve(done, exc)
        except Exception as exc:  # the request failed: each report's sender decides what next
            for _, _, done in waiting:
                _resolve(done, exc)
        finally:
            self._release()


def _resolve(done: asyncio.Future[T], answer: T | Exception) -> None:
    if done.done():  # its sender was cancelled
        return
    if isinstance(answer, Exception):
        done.set_exception(answer)
    else:
        done.set_result(answer)


async def _settle(done: asyncio.Future[TaskWithNext], alone: _Send) -> None:
    """Resolve `done` with the answer of the report's own request, or its error."""
    try:
        _resolve(done, await alone())
    except Exception as exc:
        _resolve(done, exc)


class Worker:
    """An agent: registers, takes tasks, runs `handler` on each (see the module docstring)."""

    def __init__(
        self,
        url: str,
        agent_id: str,
        *,
        capabilities: Sequence[str] | None = None,
        concurrency: int = 4,
        token: str | None = None,
        handler: Handler | None = None,
        poll_seconds: float = 5.0,
        grace_seconds: float = 30.0,
        watch_seconds: float = 0.5,
        nats_url: str | None = None,
        claim: bool = True,
        adopt_seconds: float | None = None,
    ) -> None:
        if not 1 <= concurrency <= 100:
            raise ValueError("concurrency must be between 1 and 100")
        self.url = url
        self.agent_id = agent_id
        self.capabilities = list(capabilities) if capabilities is not None else None
        self.concurrency = concurrency
        self.token = token
        self._handler = handler
        self.poll_seconds = poll_seconds
        self.grace_seconds = grace_seconds
        self.watch_seconds = watch_seconds
        # Push: the relay announces each assignment on the agent's subject, which wakes the
        # search for pushed tasks at once; the periodic search is then only a safety net.
        self.nats_url = nats_url
        # False: take only what the assigner gives (its scoring and fair share decide), no claims.
        self.claim = claim
        self.adopt_seconds = adopt_seconds if adopt_seconds is not None else (
            10.0 if nats_url else 0.5)
        self.completed = 0
        self.failed = 0
        self.released = 0
        self.looks = 0  # searches for pushed tasks done (a signal tests can wait for)
        self._lock = threading.Lock()
        self._running: dict[uuid.UUID, _Attempt] = {}
        self._client: AsyncDispatchClient
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._freed: asyncio.Event | None = None
        self._reports: _Reports
        self._traced = False

    def handler(self, fn: Handler) -> Handler:
        """Decorator: the coroutine function run once per task."""
        self._handler = fn
        return fn

    def run(self) -> None:
        """Run until SIGTERM or SIGINT, then shut down gracefully."""
        asyncio.run(self.serve(install_signals=True))

    def stop(self) -> None:
        """Stop claiming and shut down (safe from any thread)."""
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)

    async def serve(self, *, install_signals: bool = False) -> None:
        """Work until stop() (or a signal, with install_signals), then shut down gracefully."""
        if self._handler is None:
            raise ValueError("no handler: decorate a coroutine function with @worker.handler")
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._freed = asyncio.Event()
        self._traced = tracing.active()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._stopping.set)
        # Long polls must outlast their wait on the server.
        self._client = AsyncDispatchClient(
            self.url, self.agent_id, token=self.token, timeout=self.poll_seconds + 30
        )
        self._reports = _Reports(self._client, self._then)
        keeper_stop = threading.Event()
        keeper = threading.Thread(
            target=self._keep, args=(keeper_stop,), name=f"dispatch-keeper-{self.agent_id}",
            daemon=True,
        )
        push = None
        try:
            push = await self._subscribe(self.nats_url) if self.nats_url else None
            await self._register()
            keeper.start()
            # A claim returns the tasks the assigner pushed to this agent before new ones, and
            # the server wakes it when one is pushed: a claiming worker needs no other search.
            loops = [asyncio.create_task(
                self._claim_loop() if self.claim else self._adopt_loop())]
            stopping = asyncio.create_task(self._stopping.wait())
            await asyncio.wait([stopping, *loops], return_when=asyncio.FIRST_COMPLETED)
            # A loop only ends early on a bug: shut down gracefully all the same, then say so.
            crashed = next((t for t in loops if t.done()), None)
            self._stopping.set()
            log.info("worker %s stopping", self.agent_id)
            self._freed.set()  # the search for pushed tasks may be waiting: it ends now
            with contextlib.suppress(DispatchError, httpx.HTTPError):
                # Out of the assigner's choices (and a claim does not make it ready again).
                await self._client.heartbeat("degraded")
            # The claim in flight finishes: a task it took is run, not lost.
            await asyncio.gather(*loops, return_exceptions=True)
            await self._drain()
            await self._sweep()
            with contextlib.suppress(DispatchError, httpx.HTTPError):
                await self._client.heartbeat("stopped")
            if crashed is not None:
                crashed.result()
        finally:
            if push is not None:
                with contextlib.suppress(Exception):
                    await push.close()
            keeper_stop.set()
            if keeper.is_alive():
                await asyncio.to_thread(keeper.join, 10)
            await self._client.aclose()
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    self._loop.remove_signal_handler(sig)

    async def _register(self) -> None:
        """Register, waiting out an API that is not up yet (a refusal is final)."""
        assert self._stopping is not None
        delay = 0.5
        while True:
            try:
                await self._client.register(
                    capabilities=self.capabilities, max_concurrent=self.concurrency,
                    status="ready",
                )
                log.info("worker %s registered", self.agent_id)
                return
            except httpx.TransportError as exc:
                log.warning("cannot reach %s (%s); retrying", self.url, exc)
                if self._stopping.is_set():
                    raise
                await self._pause(delay)
                delay = min(delay * 2, 10.0)

    async def _subscribe(self, url: str) -> _Closable:
        try:
            import nats
        except ImportError:
            raise RuntimeError(
                "push mode needs nats-py: pip install 'dispatch-broker[push]'"
            ) from None
        assert self._freed is not None
        freed = self._freed

        async def assigned(_msg: object) -> None:
            freed.set()

        nc = await nats.connect(servers=[url], name=f"dispatch-worker-{self.agent_id}",
                                allow_reconnect=True, max_reconnect_attempts=-1)
        await nc.subscribe(f"swarm.dispatch.agent.{self.agent_id}.assigned", cb=assigned)
        log.info("worker %s: pushes from %s", self.agent_id, self.nats_url)
        return nc

    # taking work

    def _room(self) -> int:
        with self._lock:
            return self.concurrency - len(self._running)

    async def _claim_loop(self) -> None:
        assert self._stopping is not None
        key: str | None = None
        while not self._stopping.is_set():
            # Ask for at least one: while full, the server holds the claim until room frees up
            # (its limit is ours), so a freed slot is filled without a round trip. A claim whose
            # answer was lost on the way is sent again under its key: it answers what it took.
            key = key or uuid.uuid4().hex
            try:
                tasks = await self._client.claim_many(
                    max(1, self._room()), capabilities=self.capabilities,
                    wait_seconds=self.poll_seconds, start=True, idempotency_key=key,
                )
            except (DispatchError, httpx.HTTPError) as exc:
                log.warning("claim failed: %s", exc)
                await self._pause(1.0)
                continue
            key = None
            self._launch_all(tasks)

    async def _adopt_loop(self) -> None:
        """Tasks the assigner pushed to this agent (it does to every registered agent) wait in
        `assigned`: start them, with their lease, and run them like claimed ones."""
        assert self._stopping is not None and self._freed is not None
        # After a slot frees, the assigner's push follows within milliseconds: look at once,
        # then a few times more at growing intervals, then only now and then (or on a push).
        soon: list[float] = []
        while not self._stopping.is_set():
            # Cleared before looking, so a push that lands while we look is not forgotten.
            self._freed.clear()
            found = await self._adopt() if self._room() > 0 else 0
            self.looks += 1
            if found:
                soon = []
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait(), soon.pop(0) if soon else
                                       self.adopt_seconds)
                soon = [0.01, 0.03, 0.1]

    async def _adopt(self) -> int:
        """Start and run the tasks pushed to this agent; how many were found."""
        try:
            page = await self._client.list(
                assignee=self.agent_id, status=[TaskStatus.ASSIGNED], limit=self.concurrency,
            )
        except (DispatchError, httpx.HTTPError) as exc:
            log.warning("looking for pushed tasks failed: %s", exc)
            return 0
        for task in page.tasks:
            if self._room() <= 0 or self._stopping is None or self._stopping.is_set():
                break
            with self._lock:
                if task.task_id in self._running:
                    continue
            try:
                started = await self._client.start(task.task_id, lease=task.lease)
            except LOST:
                continue
            except (DispatchError, httpx.HTTPError) as exc:
                log.warning("task %s: start failed: %s", task.task_id, exc)
                continue
            self._launch(started)
        return len(page.tasks)

    async def _pause(self, seconds: float) -> None:
        assert self._stopping is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _then(self) -> NextClaim | None:
        """What a report claims for the slot it frees: the next task, started, in the same
        request (one request per task instead of a claim and a report). Not while stopping, nor
        for a worker that takes only what the assigner gives."""
        if not self.claim or self._stopping is None or self._stopping.is_set():
            return None
        return NextClaim(start=True)

    def _launch_all(self, tasks: Sequence[Task]) -> None:
        for task in tasks:
            self._launch(task)

    def _launch(self, task: Task) -> None:
        attempt = _Attempt(task=task, started=time.monotonic(), last_beat=time.monotonic())
        with self._lock:
            held = self._running.get(task.task_id)
            # A new attempt of a task this worker just reported on (a failure whose retry its
            # `next` claimed back) replaces the finishing one; the same attempt twice does not.
            # Leases are random tokens: the same lease is the same attempt, any other a new one
            # (an older one cannot come back: its start or claim was fenced before the new one).
            if held is not None and held.task.lease == task.lease:
                return
            self._running[task.task_id] = attempt
        assert self._handler is not None
        if self._traced:  # the handler and its reports in the span, which ends with them
            ctx, span = tracing.handling(task)
            attempt.runner = asyncio.create_task(
                self._handler(TaskContext(self, attempt)), context=ctx.copy()
            )
            attempt.job = asyncio.create_task(self._run(attempt), name=str(task.task_id),
                                              context=ctx)
            attempt.job.add_done_callback(lambda _: span.end())
            return
        attempt.runner = asyncio.create_task(self._handler(TaskContext(self, attempt)))
        attempt.job = asyncio.create_task(self._run(attempt), name=str(task.task_id))

    # running one task

    async def _run(self, attempt: _Attempt) -> None:
        task = attempt.task
        handler = attempt.runner
        assert handler is not None
        try:
            try:
                result = await handler
            except asyncio.CancelledError:
                if attempt.lost is not None:
                    log.info("task %s: handler cancelled, %s", task.task_id, attempt.lost)
                    return
                if handler.cancelled():
                    # The shutdown's grace ran out: the work did not get to finish, which is no
                    # failure of it. Someone else may run it, with no attempt counted.
                    await self._release(attempt, "worker shut down")
                    return
                raise
            except TaskLost:
                return
            except WaitForSignal as wait:
                log.info("task %s: suspended until %s", task.task_id, wait.waiting_for)
                why, seconds = wait.waiting_for, wait.timeout_seconds
                answer = await self._deliver(task, "suspend", lambda: self._client.suspend(
                    task.task_id, why, seconds, lease=task.lease))
                if isinstance(answer, DispatchError):
                    await self._report_fail(attempt, f"could not suspend: {answer}", retry=True)
                return
            except TaskError as exc:
                log.info("task %s failed: %s", task.task_id, exc)
                await self._report_fail(attempt, str(exc), retry=exc.retryable)
                return
            except Exception as exc:
                log.info("task %s failed: %s", task.task_id, _describe(exc))
                await self._report_fail(attempt, _failure(exc), retry=True)
                return
            if attempt.lost is None:
                await self._report_done(attempt, result)
            return
        finally:
            with self._lock:
                if self._running.get(task.task_id) is attempt:
                    del self._running[task.task_id]
            if self._freed is not None:
                self._freed.set()

    async def _report_done(self, attempt: _Attempt, result: object) -> None:
        """Complete the task with `result`; one that cannot be sent or that the broker refuses
        fails it instead, not retryable (the same work would give the same result), saying why."""
        task = attempt.task
        size, problem = _encodable(result)
        if problem is not None:
            log.warning("task %s: %s", task.task_id, problem)
            await self._report_fail(attempt, problem, retry=False)
            return
        answer = await self._deliver(task, "completion", lambda: self._reports.send(
            report_item(task.task_id, "complete", lease=task.lease, result=result),
            lambda: self._client.complete(task.task_id, result, lease=task.lease,
                                          then=self._then())))
        if isinstance(answer, DispatchError):
            why = (f"result refused by the broker: {answer.status} {answer.message}; "
                   f"the completion was {size:,} bytes")
            log.warning("task %s: %s", task.task_id, why)
            await self._report_fail(attempt, why, retry=False)
        elif answer is not None:
            self.completed += 1
            self._launch_all(answer.next)

    async def _report_fail(self, attempt: _Attempt, error: str, *, retry: bool) -> None:
        if attempt.lost is not None:
            return
        task = attempt.task
        error = _fit(error)
        answer = await self._deliver(task, "failure", lambda: self._reports.send(
            report_item(task.task_id, "fail", lease=task.lease, error=error,
                        retry_eligible=retry),
            lambda: self._client.fail(task.task_id, error, retry_eligible=retry,
                                      lease=task.lease, then=self._then())))
        if isinstance(answer, DispatchError):
            # Refused even so (a body limit below the error's size?): a short failure says why.
            short = _fit(f"error refused by the broker: {answer.status} {answer.message}", 500)
            answer = await self._deliver(task, "failure", lambda: self._client.fail(
                task.task_id, short, retry_eligible=retry, lease=task.lease, then=self._then()))
            if isinstance(answer, DispatchError):
                log.warning("task %s: failure refused: %s", task.task_id, answer)
                return
        if answer is not None:
            self.failed += 1
            self._launch_all(answer.next)

    async def _release(self, attempt: _Attempt, reason: str) -> None:
        """Give the task back unfinished: pending again at once, no attempt counted."""
        if attempt.lost is not None:
            return
        task = attempt.task
        answer = await self._deliver(task, "release", lambda: self._client.release(
            task.task_id, reason, lease=task.lease))
        if isinstance(answer, DispatchError):
            log.warning("task %s: release refused: %s", task.task_id, answer)
        elif answer is not None:
            self.released += 1

    async def _deliver(self, task: Task, what: str,
                       send: Callable[[], Awaitable[T]]) -> T | DispatchError | None:
        """Send a report, again after a failure that may pass (network, 5xx, 429). Its answer;
        the broker's refusal (a 4xx other than those that say the attempt is no longer ours), for
        the caller to act on; None when the attempt is lost or the broker stays out of reach
        (logged)."""
        for pause in (*RESEND_SECONDS, None):
            problem: Exception
            try:
                return await send()
            except LOST as exc:
                log.info("task %s: %s refused, %s", task.task_id, what, exc.message)
                return None
            except DispatchError as exc:
                if 400 <= exc.status < 500 and exc.status not in (401, 408, 429):
                    return exc
                problem = exc
            except httpx.HTTPError as exc:
                problem = exc
            if pause is None:
                log.warning("task %s: %s not reported: %s", task.task_id, what, problem)
                return None
            log.warning("task %s: %s not reported (%s); again in %ss", task.task_id, what,
                        problem, pause)
            await asyncio.sleep(pause)
        return None

    def _lose(self, attempt: _Attempt, reason: str) -> None:
        """The attempt is no longer ours: cancel its handler (from any thread)."""
        with self._lock:
            if attempt.lost is not None:
                return
            attempt.lost = reason
        runner = attempt.runner
        if runner is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(runner.cancel)

    async def _drain(self) -> None:
        """Let running handlers finish within the grace period; cancel the rest (each is
        released: see _run)."""
        deadline = time.monotonic() + self.grace_seconds
        while self._room() < self.concurrency and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with self._lock:
            left = list(self._running.values())
        for attempt in left:
            if attempt.runner is not None:
                attempt.runner.cancel()
        waiting = [a.job for a in left if a.job is not None]
        if waiting:
            await asyncio.wait(waiting, timeout=10)

    async def _sweep(self) -> None:
        """Tasks the assigner gave this agent that it never started (or whose claim's answer was
        lost) go back now, rather than wait out their timeout."""
        try:
            page = await self._client.list(
                assignee=self.agent_id, status=[TaskStatus.ASSIGNED, TaskStatus.RUNNING],
                limit=500,
            )
        except (DispatchError, httpx.HTTPError) as exc:
            log.warning("could not look for tasks left behind: %s", exc)
            return
        for task in page.tasks:
            with self._lock:
                if task.task_id in self._running:
                    continue
            await self._release(_Attempt(task=task, started=0.0), "worker shut down")

    # the keeper thread: leases and cancellation, outside the handlers' event loop

    def _keep(self, stop: threading.Event) -> None:
        watched = 0.0
        with DispatchClient(self.url, self.agent_id, token=self.token, timeout=10) as client:
            while not stop.wait(self._keeper_pause()):
                try:
                    self._beat(client)
                    if time.monotonic() - watched >= self.watch_seconds:
                        watched = time.monotonic()
                        self._watch(client)
                except (DispatchError, httpx.HTTPError) as exc:
                    log.warning("lease keeper: %s", exc)

    def _keeper_pause(self) -> float:
        """A quarter of the shortest heartbeat interval in flight, at most watch_seconds."""
        with self._lock:
            beats = [a.task.heartbeat_seconds for a in self._running.values()
                     if a.task.heartbeat_seconds is not None]
        return min([self.watch_seconds, *(b / 4 for b in beats)])

    def _beat(self, client: DispatchClient) -> None:
        """A task with heartbeat_seconds times out without progress: repeat the handler's last
        report (a bare one would erase what it said) every third of that interval."""
        now = time.monotonic()
        with self._lock:
            due = [(a, dict(a.progress)) for a in self._running.values()
                   if a.lost is None and a.task.heartbeat_seconds is not None
                   and now - a.last_beat >= a.task.heartbeat_seconds / 3]
        for attempt, report in due:
            task = attempt.task
            try:
                client.progress(
                    task.task_id, report.get("percent"),  # type: ignore[arg-type]
                    report.get("message"),  # type: ignore[arg-type]
                    report.get("data"), lease=task.lease,
                )
                with self._lock:
                    attempt.last_beat = now
            except LOST as exc:
                self._lose(attempt, exc.message)

    def _watch(self, client: DispatchClient) -> None:
        """One read tells which attempts are still ours: a cancellation (or a timeout, or a
        reassignment) shows here within watch_seconds, without a write per task."""
        asked = time.monotonic()
        with self._lock:
            attempts = [a for a in self._running.values() if a.lost is None]
        if not attempts:
            return
        page = client.list(
            assignee=self.agent_id, status=[TaskStatus.ASSIGNED, TaskStatus.RUNNING],
            limit=500,
        )
        held = {t.task_id: t.lease for t in page.tasks}
        for attempt in attempts:
            if attempt.started < asked and held.get(attempt.task.task_id) != attempt.task.lease:
                self._lose_checked(client, attempt)

    def _lose_checked(self, client: DispatchClient, attempt: _Attempt) -> None:
        """The listing no longer shows the attempt: confirm with the task itself (it may have
        just finished here) before cancelling the handler."""
        with self._lock:
            if attempt.task.task_id not in self._running:
                return
        try:
            now = client.get(attempt.task.task_id)
        except NotFound:
            self._lose(attempt, "the task is gone")
            return
        if (now.lease != attempt.task.lease or now.assigned_agent != self.agent_id
                or now.status not in (TaskStatus.ASSIGNED, TaskStatus.RUNNING)):
            self._lose(attempt, f"the task is {now.status} (lease {now.lease})")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def without_nul(value: object) -> object:
    """`value` with each NUL character of its strings (keys too) replaced by U+FFFD."""
    if isinstance(value, str):
        return value.replace("\x00", NUL_REPLACEMENT)
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [without_nul(v) for v in value]
    return value


def _fit(error: str, limit: int = ERROR_LIMIT) -> str:
    """An error the broker takes: no NUL, at most `limit` characters (the cut said)."""
    error = error.replace("\x00", NUL_REPLACEMENT)
    if len(error) <= limit:
        return error
    note = f"... ({len(error):,} characters, cut)"
    return error[:limit - len(note)] + note


def _unstorable(value: object, path: str, depth: int = 0) -> str | None:
    """Where `value` holds what JSON or PostgreSQL cannot (NaN or infinity, NUL), said."""
    if depth > 1000:
        return None  # json.dumps says it (RecursionError)
    if isinstance(value, float) and not math.isfinite(value):
        name = "NaN" if math.isnan(value) else repr(value)
        return f"result is not JSON: {name} at {path}"
    if isinstance(value, str) and "\x00" in value:
        return (f"result is not storable: a NUL character in {path} "
                f"(PostgreSQL text cannot hold one)")
    if isinstance(value, dict):
        for k, v in value.items():
            where = f"{path}[{k!r}]"
            if isinstance(k, str) and "\x00" in k:
                return (f"result is not storable: a NUL character in a key of {path} "
                        f"(PostgreSQL text cannot hold one)")
            found = _unstorable(v, where, depth + 1)
            if found:
                return found
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = _unstorable(v, f"{path}[{i}]", depth + 1)
            if found:
                return found
    return None


def _encodable(result: object) -> tuple[int, str | None]:
    """The size of `result` as the completion's JSON, or why it cannot be one (as the client
    encodes it: NaN and objects JSON has no form for are refused, not converted)."""
    problem = _unstorable(result, "result")
    if problem is not None:
        return 0, problem
    try:
        body = json.dumps(result, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        return 0, f"result is not JSON: {exc}"
    return len(body.encode()), None


def _failure(exc: BaseException) -> str:
    """The error a failed task records: the exception and the end of its traceback."""
    tail = "".join(traceback.format_exception(exc)[-3:])
    return f"{_describe(exc)}\n{tail}".strip()
