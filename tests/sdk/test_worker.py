"""The worker SDK against a real `dispatch serve`: throughput with a concurrency limit,
cancellation, a handler that blocks its event loop, failures (retryable or not), tasks pushed by
the assigner, and graceful shutdown of a real worker process."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx

from dispatch.models import Task, TaskEvent
from dispatch.sdk.client import DispatchClient
from dispatch.sdk.worker import Permanent, TaskContext, WaitForSignal, Worker
from tests.sdk import agent as agent_process
from tests.sdk.conftest import eventually
from tests.serve import ServeProcess

TERMINAL = {"completed", "failed", "timed_out", "cancelled"}


@contextlib.contextmanager
def working(worker: Worker) -> Iterator[Worker]:
    """The worker, serving in a thread of its own (its own event loop) until the block ends."""
    failure: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(worker.serve())
        except BaseException as exc:  # reported by the test, not lost in the thread
            failure.append(exc)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker_stopped = time.monotonic() + 60
        while worker._loop is None and thread.is_alive() and time.monotonic() < worker_stopped:
            time.sleep(0.01)
        worker.stop()
        thread.join(60)
    assert not thread.is_alive(), "the worker did not stop"
    assert not failure, failure


def statuses(client: DispatchClient, ids: list[uuid.UUID]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for task in client.iter_tasks(requester="alice", limit=500):
        if task.task_id in ids:
            counts[task.status] = counts.get(task.status, 0) + 1
    return counts


def test_two_hundred_tasks_with_four_in_flight(sp: ServeProcess) -> None:
    in_flight = 0
    most = 0
    lock = threading.Lock()
    worker = Worker(sp.api, "w-200", capabilities=["math"], concurrency=4, poll_seconds=2)

    @worker.handler
    async def square(ctx: TaskContext) -> object:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        try:
            await ctx.progress(50, "squaring")
            await asyncio.sleep(0.02)
            n = ctx.metadata["n"]
            assert isinstance(n, int)
            return {"square": n * n}
        finally:
            with lock:
                in_flight -= 1

    with DispatchClient(sp.api, "alice") as alice:
        ids = [alice.create(f"square {n}", required_capabilities=["math"], metadata={"n": n})
               .task_id for n in range(200)]
        with working(worker):
            eventually(lambda: statuses(alice, ids), lambda c: c.get("completed") == 200,
                       timeout=120, what="200 completed")
        for n, task_id in enumerate(ids):
            task = alice.get(task_id)
            assert task.status == "completed" and task.result == {"square": n * n}
            assert task.assigned_agent == "w-200" and task.retry_count == 0
            assert task.progress == {"percent": 50, "message": "squaring"}
    assert most == 4, f"at most {most} ran at once"
    assert worker.completed == 200 and worker.failed == 0


def test_a_cancelled_task_cancels_its_handler_within_a_second(sp: ServeProcess) -> None:
    began = threading.Event()
    cancelled_at: list[float] = []
    worker = Worker(sp.api, "w-cancel", concurrency=2)

    @worker.handler
    async def slow(ctx: TaskContext) -> object:
        if ctx.metadata.get("quick"):
            return "done"
        began.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled_at.append(time.monotonic())
            raise
        return "too late"

    with DispatchClient(sp.api, "alice") as alice, working(worker):
        task = alice.create("long job")
        assert began.wait(30), "the handler never started"
        assert alice.cancel(task.task_id, "changed my mind").status == "cancelled"
        asked = time.monotonic()
        eventually(lambda: cancelled_at, bool, timeout=1, what="handler cancelled")
        assert cancelled_at[0] - asked < 1
        # The worker reports nothing more on it, and goes on to other work.
        after = alice.create("next", metadata={"quick": True})
        done = eventually(lambda: alice.get(after.task_id), lambda t: t.status == "completed")
        assert done.result == "done"
        assert alice.get(task.task_id).status == "cancelled"
        events = [e.event for e in alice.events(task.task_id)]
        assert events[-1] == "cancelled" and "failed" not in events


def test_a_handler_that_blocks_its_loop_keeps_its_task(sp: ServeProcess) -> None:
    """heartbeat_seconds 2: without progress for two seconds the reaper times the attempt out.
    The handler blocks the worker's event loop for 5 s; the keeper thread's heartbeats hold the
    lease. (2, not 1: a task the assigner pushes is found by the worker's next look, every
    half second, and the heartbeat clock runs from the assignment.)"""
    worker = Worker(sp.api, "w-block", concurrency=1)

    @worker.handler
    async def blocking(ctx: TaskContext) -> object:
        await ctx.progress(10, "about to block")
        time.sleep(5)  # a CPU-bound or blocking call in an async handler
        return {"blocked_for": 5}

    with DispatchClient(sp.api, "alice") as alice, working(worker):
        task = alice.create("blocks", heartbeat_seconds=2, max_retries=0)
        done = eventually(lambda: alice.get(task.task_id), lambda t: t.status in TERMINAL)
        events = alice.events(task.task_id)
        assert done.status == "completed", [(e.created_at.time(), e.event, e.actor) for e in events]
        assert done.result == {"blocked_for": 5}
        names = [e.event for e in events]
        assert "timeout" not in names and names.count("assigned") == 1
        beats = [e for e in events if e.event == "progress"]
        assert len(beats) >= 3, names
        # The heartbeats repeat the handler's last report rather than erase it.
        assert all(e.payload["message"] == "about to block" for e in beats)


def test_failures_retry_unless_permanent(sp: ServeProcess) -> None:
    worker = Worker(sp.api, "w-fail", concurrency=2)

    @worker.handler
    async def flaky(ctx: TaskContext) -> object:
        if ctx.metadata.get("permanent"):
            raise Permanent("the input is malformed")
        if ctx.task.retry_count == 0:
            raise RuntimeError("transient glitch")
        return "second time lucky"

    with DispatchClient(sp.api, "alice") as alice, working(worker):
        retried = alice.create("flaky", max_retries=3)
        doomed = alice.create("doomed", max_retries=3, metadata={"permanent": True})
        done = eventually(lambda: alice.get(retried.task_id), lambda t: t.status in TERMINAL)
        assert done.status == "completed" and done.result == "second time lucky"
        assert done.retry_count == 1
        first_failure = next(e for e in alice.events(retried.task_id) if e.event == "failed")
        assert "RuntimeError: transient glitch" in str(first_failure.payload["error"])
        assert first_failure.payload["retry_eligible"] is True
        dead = eventually(lambda: alice.get(doomed.task_id), lambda t: t.status in TERMINAL)
        assert dead.status == "failed" and dead.retry_count == 0
        assert dead.error == "the input is malformed"


def test_a_handler_waits_for_a_signal_without_holding_its_slot(sp: ServeProcess) -> None:
    """WaitForSignal suspends the task: the worker's one slot runs other work meanwhile; the
    signal brings the task back to this worker, whose handler runs again with the payload."""
    worker = Worker(sp.api, "w-signal", capabilities=["ask"], concurrency=1, poll_seconds=1)
    runs: list[object] = []

    @worker.handler
    async def ask(ctx: TaskContext) -> object:
        runs.append(ctx.task.signal)
        if ctx.metadata.get("ask") and ctx.task.signal is None:
            raise WaitForSignal("the user's answer", timeout_seconds=600)
        return {"answer": ctx.task.signal}

    with DispatchClient(sp.api, "alice") as alice, working(worker):
        question = alice.create("question", required_capabilities=["ask"], metadata={"ask": 1})
        eventually(lambda: alice.get(question.task_id), lambda t: t.status == "suspended")
        # The slot is free: another task runs while the question waits.
        other = alice.create("other", required_capabilities=["ask"])
        done = eventually(lambda: alice.get(other.task_id), lambda t: t.status in TERMINAL)
        assert done.status == "completed"
        alice.signal(question.task_id, {"choice": "b"})
        answered = eventually(lambda: alice.get(question.task_id),
                              lambda t: t.status in TERMINAL)
    assert answered.status == "completed" and answered.result == {"answer": {"choice": "b"}}
    assert answered.retry_count == 0 and answered.previous_agents == []
    assert [e.event for e in alice_events(sp, question.task_id)].count("assigned") == 2


def alice_events(sp: ServeProcess, task_id: uuid.UUID) -> list[TaskEvent]:
    with DispatchClient(sp.api, "alice") as alice:
        return list(alice.events(task_id))


def test_tasks_pushed_by_the_assigner_are_run_too(sp: ServeProcess, admin: DispatchClient) -> None:
    """A registered agent is a candidate of the assigner as well as a claimer: what the assigner
    gives it is picked up, started with its lease and run."""
    with DispatchClient(sp.api, "w-push") as agent:
        agent.register(capabilities=["push"], max_concurrent=1)
    with DispatchClient(sp.api, "alice") as alice:
        task = alice.create("pushed", required_capabilities=["push"])
        pushed = eventually(lambda: alice.get(task.task_id), lambda t: t.status == "assigned")
        assert pushed.assigned_agent == "w-push"
        worker = Worker(sp.api, "w-push", capabilities=["push"], concurrency=1)

        @worker.handler
        async def echo(ctx: TaskContext) -> object:
            return {"lease": ctx.lease}

        with working(worker):
            done = eventually(lambda: alice.get(task.task_id), lambda t: t.status == "completed")
        assert done.result == {"lease": pushed.lease}


def wait_attempts(client: DispatchClient, task: Task) -> int:
    return sum(1 for e in client.events(task.task_id) if e.event == "assigned")


def test_sigterm_mid_run_loses_nothing(sp: ServeProcess, tmp_path: Path) -> None:
    """A real worker process gets SIGTERM with four tasks in flight: it stops claiming, the short
    ones finish within the grace period, the long ones are given back (released), and every task
    ends completed or pending again with no attempt counted against it."""
    with DispatchClient(sp.api, "alice") as alice:
        tasks = [alice.create(f"t{i}", metadata={"seconds": 0.05 if i % 3 else 60})
                 for i in range(30)]
        long_ids = [t.task_id for t in tasks if t.metadata["seconds"] == 60]
        log_path = tmp_path / "worker.log"
        with agent_process.running(sp.api, "w-term", 1.5, log_path) as proc:
            # Four long tasks hold every slot: the worker is mid-run, with nothing about to end.
            eventually(lambda: statuses(alice, long_ids), lambda c: c.get("running", 0) == 4,
                       timeout=60, what="four tasks running")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, log_path.read_text()
        output = log_path.read_text()
        assert "stopped:" in output, output
        for task in tasks:
            now = alice.get(task.task_id)
            attempts = wait_attempts(alice, task)
            assert now.status in ("completed", "pending"), (now.title, now.status, output)
            assert now.retry_count == 0, (now.title, now.retry_count)
            if attempts and now.status == "pending":
                # Given back with no agent left to take it, it may be reported unmatched since.
                last = [e for e in alice.events(task.task_id) if e.event != "unmatched"][-1]
                assert last.event == "released" and last.actor == "w-term", last
                assert last.payload["reason"] == "worker shut down"
        assert sum(1 for t in tasks if wait_attempts(alice, t)
                   and alice.get(t.task_id).status == "pending") == 4
    with DispatchClient(sp.api, "ops", admin_token=sp.admin_token) as ops:
        agent = next(a for a in ops.agents() if a.agent_id == "w-term")
        assert agent.status == "stopped" and agent.active_tasks == 0


def test_a_task_pushed_but_never_started_goes_back_at_shutdown(sp: ServeProcess) -> None:
    """The assigner gives the worker a task after its last look, then the worker stops: the task
    is given back (pending again, no attempt counted) instead of waiting out its timeout in
    `assigned`."""
    ran: list[str] = []
    worker = Worker(sp.api, "w-sweep", claim=False, adopt_seconds=600)

    @worker.handler
    async def never(ctx: TaskContext) -> object:
        ran.append(ctx.task.title)
        return None

    with DispatchClient(sp.api, "alice") as alice:
        with working(worker):
            eventually(lambda: worker.looks, lambda n: n >= 1, what="the first look")
            task = alice.create("pushed late", timeout_seconds=3600)
            eventually(lambda: alice.get(task.task_id), lambda t: t.status == "assigned")
        now = alice.get(task.task_id)
        assert ran == []
        assert now.status == "pending" and now.retry_count == 0
        assert now.error is None and now.previous_agents == ["w-sweep"]
        assert alice.events(task.task_id)[-1].event == "released"


def requests_by_path(ops_url: str) -> dict[tuple[str, str], float]:
    """The API's requests so far, by method and path template (its /metrics)."""
    text = httpx.get(f"{ops_url}/metrics", timeout=10).text
    served: dict[tuple[str, str], float] = {}
    for m in re.finditer(r'^dispatch_http_requests_total\{(.*)\} (\S+)$', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        key = (labels["method"], labels["path"])
        served[key] = served.get(key, 0) + float(m.group(2))
    return served


def test_an_idle_worker_makes_one_claim_per_wait(sp: ServeProcess) -> None:
    """An idle agent costs one long poll per poll_seconds: no listing in between (the claim
    returns what the assigner pushed to it, and the push wakes the claim)."""
    worker = Worker(sp.api, "w-idle", concurrency=4, poll_seconds=2)

    @worker.handler
    async def never(ctx: TaskContext) -> object:
        return None

    with working(worker):
        eventually(lambda: requests_by_path(sp.ops).get(("POST", "/api/v1/tasks/claim"), 0),
                   lambda n: n >= 1, what="the first claim")
        before = requests_by_path(sp.ops)
        time.sleep(6.5)
        after = requests_by_path(sp.ops)
    made = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    # 6.5 s of 2 s long polls: three or four claims, and nothing else.
    assert set(made) == {("POST", "/api/v1/tasks/claim")}, made
    assert 3 <= made[("POST", "/api/v1/tasks/claim")] <= 4, made


def test_a_busy_worker_makes_about_one_request_per_task(sp: ServeProcess) -> None:
    """Each completion claims the worker's next task, started, in the same request: a backlog is
    drained with about one request per task (before, a claim and a completion each)."""
    worker = Worker(sp.api, "w-busy", concurrency=2, poll_seconds=2)

    @worker.handler
    async def quick(ctx: TaskContext) -> object:
        return None

    with DispatchClient(sp.api, "alice") as alice:
        ids = [alice.create(f"t{i}").task_id for i in range(40)]
        before = requests_by_path(sp.ops)
        with working(worker):
            eventually(lambda: statuses(alice, ids), lambda c: c.get("completed") == 40,
                       what="the backlog drained")
        after = requests_by_path(sp.ops)
    made = {k[1]: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)
            and k[0] == "POST"}
    assert made["/api/v1/tasks/{task_id}/complete"] == 40, made
    assert "/api/v1/tasks/{task_id}/start" not in made, made
    assert made.get("/api/v1/tasks/claim", 0) <= 10, made
