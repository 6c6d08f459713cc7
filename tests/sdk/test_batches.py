"""The worker sends the reports that are ready together in one request: a busy worker's
completions cost one request (and one transaction) for several tasks, each still answered on its
own, and the batch's `next` claims a task for every slot it frees."""

from __future__ import annotations

import asyncio
import re
import threading

import httpx

from dispatch.sdk.client import DispatchClient
from dispatch.sdk.worker import TaskContext, Worker
from tests.sdk.conftest import eventually
from tests.sdk.test_worker import statuses, working
from tests.serve import ServeProcess

BATCH = 8


def requests_to(sp: ServeProcess, action: str) -> int:
    """Requests serve answered on POST /api/v1/tasks/...{action}, from its metrics."""
    text = httpx.get(f"{sp.ops}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("dispatch_http_requests_total{") and 'method="POST"' in line:
            path = re.search(r'path="([^"]*)"', line)
            if path and path.group(1).endswith(action):
                total += float(line.rsplit(" ", 1)[1])
    return int(total)


def together(worker: Worker, size: int) -> threading.Event:
    """A handler that holds every task until `size` of them run at once, then returns each
    task's own result; the event is set when they are let go."""
    running = 0
    released = threading.Event()

    @worker.handler
    async def hold(ctx: TaskContext) -> object:
        nonlocal running
        running += 1
        while running < size and not released.is_set():
            await asyncio.sleep(0.01)
        released.set()
        return {"n": ctx.metadata["n"], "pad": "x" * int(str(ctx.metadata.get("pad", 0)))}

    return released


def test_reports_ready_together_go_in_one_request(sp: ServeProcess) -> None:
    worker = Worker(sp.api, "w-batch", concurrency=BATCH, poll_seconds=2)
    released = together(worker, BATCH)
    with DispatchClient(sp.api, "alice") as alice:
        first = [alice.create(f"t {n}", metadata={"n": n}).task_id for n in range(BATCH)]
        with working(worker):
            assert released.wait(60), "the worker never held all its tasks at once"
            # Created after the eight were let go: the batch's `next` may claim them.
            later = [alice.create(f"t {n}", metadata={"n": n}).task_id
                     for n in range(BATCH, 2 * BATCH)]
            ids = first + later
            eventually(lambda: statuses(alice, ids), lambda c: c.get("completed") == len(ids),
                       timeout=60, what="all completed")
        for n, task_id in enumerate(ids):
            task = alice.get(task_id)
            assert task.result == {"n": n, "pad": ""}, task
            assert task.assigned_agent == "w-batch" and task.retry_count == 0
    assert worker.completed == 2 * BATCH and worker.failed == 0
    # Eight completions became ready at once: one went alone, the others waited for it and
    # left together, so fewer requests than reports.
    assert worker._reports.batches >= 1
    batched = requests_to(sp, "/reports")
    alone = requests_to(sp, "/complete")
    assert batched >= 1 and batched + alone < 2 * BATCH, (batched, alone)


def test_a_batch_refused_as_a_whole_is_sent_one_report_at_a_time(sp: ServeProcess) -> None:
    """Eight results of 200 KB each: together over serve's 1 MiB body limit (413), each alone
    under it. Every task completes with its own result; none fails."""
    worker = Worker(sp.api, "w-big", concurrency=BATCH, poll_seconds=2)
    released = together(worker, BATCH)
    pad = 200_000
    with DispatchClient(sp.api, "alice") as alice:
        ids = [alice.create(f"big {n}", metadata={"n": n, "pad": pad}).task_id
               for n in range(BATCH)]
        with working(worker):
            assert released.wait(60)
            eventually(lambda: statuses(alice, ids), lambda c: c.get("completed") == BATCH,
                       timeout=60, what="all completed")
        for n, task_id in enumerate(ids):
            assert alice.get(task_id).result == {"n": n, "pad": "x" * pad}
    assert worker.completed == BATCH and worker.failed == 0
    assert worker._reports.batches >= 1
    refused = httpx.get(f"{sp.ops}/metrics", timeout=10).text
    assert re.search(r'dispatch_http_requests_total\{[^}]*path="[^"]*/reports"[^}]*'
                     r'status_code="413"', refused), "the batch was never refused"
