"""End to end: a real `dispatch serve` process driven over HTTP with the typed client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from dispatch.errors import Conflict, Forbidden
from dispatch.models import Explanation, Task
from dispatch.sdk.client import AsyncDispatchClient, DispatchClient
from tests.serve import ServeProcess, serving

# Pull-mode tests keep the owner filter out of the way, and retry without waiting out a backoff.
PULL_ENV = {"DISPATCH_RETRY_BACKOFF_MS": "0"}


@pytest.fixture
def sp(db_url: str, tmp_path: Path) -> Iterator[ServeProcess]:
    with serving(db_url, tmp_path, env=PULL_ENV) as process:
        yield process


def client(sp: ServeProcess, agent_id: str, *, admin: bool = False) -> DispatchClient:
    return DispatchClient(sp.api, agent_id, admin_token=sp.admin_token if admin else None)


def wait_for(fetch: Callable[[], Task], ok: Callable[[Task], bool], timeout: float = 10) -> Task:
    """Poll until the task satisfies `ok` (the broker works in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        task = fetch()
        if ok(task) or time.monotonic() > deadline:
            return task
        time.sleep(0.05)


def take(worker: DispatchClient, agent_id: str, task_id: str) -> Task:
    """The task, claimed by `worker`: by its claim, or pushed to it by the assigner first (a
    registered agent is a candidate of both)."""
    task = worker.claim(wait_seconds=5)
    if task is None:
        task = wait_for(lambda: worker.get(task_id), lambda t: t.assigned_agent == agent_id)
    assert task.task_id == task_id and task.assigned_agent == agent_id
    return task


def test_original_smoke_flow(db_url: str, tmp_path: Path) -> None:
    """The original service's smoke test, with its defaults (owner filter on)."""
    with serving(db_url, tmp_path) as sp:
        health = httpx.get(f"{sp.ops}/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok" and health.json()["database"] == "ok"
        assert health.json()["nats"] == "disabled"

        r = httpx.post(f"{sp.api}/api/v1/tasks", json={"title": "smoke", "scope": "smoke"},
                       headers={"X-Agent-ID": "alice"})
        assert r.status_code == 201
        task_id = r.json()["task_id"]
        r = httpx.get(f"{sp.api}/api/v1/tasks/{task_id}", headers={"X-Agent-ID": "alice"})
        assert r.status_code == 200 and r.json()["title"] == "smoke"
        r = httpx.get(f"{sp.api}/api/v1/tasks", headers={"X-Agent-ID": "alice"})
        assert [t["task_id"] for t in r.json()] == [task_id]

        with client(sp, "worker") as worker, client(sp, "alice") as alice:
            worker.register(capabilities=["smoke"])
            worker.claim(wait_seconds=5)  # or the assigner pushes it first: either way, worker
            task = wait_for(lambda: alice.get(task_id), lambda t: t.status == "assigned")
            assert task.assigned_agent == "worker"
            done = alice.complete(task_id, {"resolved": "by hand"})  # manual resolution
            assert done.status == "completed" and done.result == {"resolved": "by hand"}

        r = httpx.get(f"{sp.api}/api/v1/stats",
                      headers={"X-Agent-ID": "ops", "Authorization": f"Bearer {sp.admin_token}"})
        assert r.status_code == 200 and r.json()["queue"]["completed"] == 1
        r = httpx.get(f"{sp.api}/api/v1/stats", headers={"X-Agent-ID": "ops"})
        assert r.status_code == 401


def test_pull_lifecycle(sp: ServeProcess) -> None:
    with client(sp, "alice") as alice, client(sp, "worker-1") as worker:
        agent = worker.register(capabilities=["review", "pull-only"], max_concurrent=2)
        assert agent.agent_id == "worker-1" and agent.max_concurrent == 2
        created = alice.create("pull me", required_capabilities=["pull-only"],
                               metadata={"n": 1})
        task = take(worker, "worker-1", created.task_id)
        assert (task.status, task.assigned_agent) == ("assigned", "worker-1")
        assert worker.start(task.task_id).status == "running"
        progressed = worker.progress(task.task_id, 50, "half way", {"step": 2})
        assert progressed.progress == {"percent": 50.0, "message": "half way",
                                       "data": {"step": 2}}
        done = worker.complete(task.task_id, {"answer": 42})
        assert (done.status, done.result) == ("completed", {"answer": 42})
        assert worker.heartbeat("ready").status == "ready"
        assert worker.claim(["pull-only"]) is None
        events = [e.event for e in alice.events(task.task_id)]
        assert events == ["created", "assigned", "started", "progress", "completed"]


def test_cancel_while_running_then_late_complete_is_409(sp: ServeProcess) -> None:
    with client(sp, "alice") as alice, client(sp, "worker-1") as worker, \
            client(sp, "mallory") as mallory:
        worker.register(capabilities=["review", "pull-only"])
        created = alice.create("long job", required_capabilities=["pull-only"])
        task = take(worker, "worker-1", created.task_id)
        worker.start(task.task_id)
        with pytest.raises(Forbidden):
            mallory.cancel(created.task_id)
        cancelled = alice.cancel(created.task_id, "no longer needed")
        assert cancelled.status == "cancelled"
        with pytest.raises(Conflict) as late:
            worker.complete(task.task_id, {"too": "late"})
        assert late.value.task is not None and late.value.task.status == "cancelled"
        assert alice.get(created.task_id).result is None


def test_fail_with_retry_then_success(sp: ServeProcess) -> None:
    with client(sp, "alice") as alice, client(sp, "worker-1") as worker:
        worker.register(capabilities=["review", "pull-only"])
        created = alice.create("flaky", required_capabilities=["pull-only"], max_retries=2)
        first = take(worker, "worker-1", created.task_id)
        failed = worker.fail(first.task_id, "transient")
        assert (failed.status, failed.retry_count, failed.error) == ("pending", 1, "transient")
        again = take(worker, "worker-1", created.task_id)
        assert worker.complete(again.task_id, "ok").status == "completed"
        events = [e.event for e in alice.events(created.task_id)]
        assert events == ["created", "assigned", "failed", "retry", "assigned", "completed"]


def test_idempotent_create_filters_and_pagination(sp: ServeProcess) -> None:
    with client(sp, "alice") as alice, client(sp, "bob") as bob:
        first, new = alice.create_ex("once", idempotency_key="k-1", required_capabilities=["x"])
        again, new_again = alice.create_ex("once", idempotency_key="k-1",
                                           required_capabilities=["x"])
        assert (new, new_again) == (True, False) and again.task_id == first.task_id
        mine = [alice.create(f"a{i}", priority=i % 4, required_capabilities=["x"]).task_id
                for i in range(6)]
        theirs = bob.create("b", source="ci", required_capabilities=["y"])
        everything = [first.task_id, *mine, theirs.task_id]

        page = alice.list(limit=3)
        assert len(page.tasks) == 3 and page.next_cursor is not None
        walked = [t.task_id for t in alice.iter_tasks(limit=3)]
        assert sorted(walked) == sorted(everything) and len(walked) == len(set(walked))
        ordered = [(t.priority, t.created_at) for t in alice.iter_tasks(limit=2)]
        assert ordered == sorted(ordered, key=lambda p: (-p[0], p[1]))

        assert {t.task_id for t in alice.list(requester="bob").tasks} == {theirs.task_id}
        assert {t.task_id for t in alice.list(source="ci").tasks} == {theirs.task_id}
        assert {t.task_id for t in alice.list(capability="y").tasks} == {theirs.task_id}
        assert len(alice.list(status=["pending"], limit=500).tasks) == len(everything)
        assert alice.list(status=["completed"]).tasks == []
        r = httpx.get(f"{sp.api}/api/v1/tasks?scope=y&agent=nobody",
                      headers={"X-Agent-ID": "alice"})
        assert r.status_code == 200 and r.json() == []


def test_metrics_show_queue_gauges_and_http_requests(sp: ServeProcess) -> None:
    with client(sp, "alice") as alice, client(sp, "worker-1") as worker:
        alice.create("counted", required_capabilities=["nobody-has-this"])
        worker.register(capabilities=["review", "pull-only"])
        done = alice.create("done", required_capabilities=["pull-only"], source="ci")
        task = take(worker, "worker-1", done.task_id)
        worker.complete(task.task_id, 1)
    text = httpx.get(f"{sp.ops}/metrics").text
    assert 'dispatch_tasks_created_total{source="api"} 1.0' in text
    assert 'dispatch_tasks_created_total{source="ci"} 1.0' in text
    assert 'dispatch_task_transitions_total{event="assigned"} 1.0' in text
    assert 'dispatch_task_transitions_total{event="completed"} 1.0' in text
    assert 'dispatch_task_run_seconds_count{status="completed"} 1.0' in text
    assert 'dispatch_queue_depth{status="pending"} 1.0' in text
    assert "dispatch_oldest_pending_seconds" in text
    assert 'dispatch_agents{status="ready"}' in text
    assert "dispatch_event_log_unpublished" in text
    assert "dispatch_database_up 1.0" in text
    assert "dispatch_http_requests_total" in text


async def test_async_client_lifecycle(sp: ServeProcess) -> None:
    async with AsyncDispatchClient(sp.api, "alice") as alice, \
            AsyncDispatchClient(sp.api, "worker-a") as worker:
        await worker.register(capabilities=["review", "pull-only"], max_concurrent=1)
        created = await alice.create("async", required_capabilities=["pull-only"])
        task = await worker.claim(wait_seconds=5)
        deadline = time.monotonic() + 10
        while task is None and time.monotonic() < deadline:  # pushed to it by the assigner
            await asyncio.sleep(0.05)
            got = await worker.get(created.task_id)
            task = got if got.assigned_agent == "worker-a" else None
        assert task is not None and task.task_id == created.task_id
        assert (await worker.start(task.task_id)).status == "running"
        assert (await worker.progress(task.task_id, 10)).progress == {"percent": 10.0}
        with pytest.raises(Forbidden):
            await alice.fail(task.task_id, "not mine")
        done = await worker.complete(task.task_id, [1, 2])
        assert (done.status, done.result) == ("completed", [1, 2])
        page = await alice.list(status=["completed"])
        assert [t.task_id for t in page.tasks] == [created.task_id] and page.next_cursor is None


async def test_async_client_has_the_admin_and_requester_calls_too(sp: ServeProcess) -> None:
    async with AsyncDispatchClient(sp.api, "alice") as alice, \
            AsyncDispatchClient(sp.api, "ops", admin_token=sp.admin_token) as ops:
        await ops.register(agent_id="coder", capabilities=["code"], admin=True)
        first, new = await alice.create_ex("one", idempotency_key="k", required_capabilities=["x"])
        again, new_again = await alice.create_ex("one", idempotency_key="k")
        assert (new, new_again, again.task_id) == (True, False, first.task_id)
        await alice.create("two", priority=5, required_capabilities=["x"])
        walked = [t.title async for t in alice.iter_tasks(limit=1)]
        assert walked == ["two", "one"]
        explanation = await ops.explain(first.task_id)
        assert isinstance(explanation, Explanation)
        assert [c.agent_id for c in explanation.candidates] == ["coder"]
        assert (await ops.drain("coder")).drained
        assert [e.event for e in await alice.events(first.task_id)] == ["created"]
        cancelled = await alice.cancel(first.task_id, "no longer needed")
        assert (await ops.requeue(cancelled.task_id)).status == "pending"
        assert (await ops.stats()).total_pending == 2


def test_a_waiting_claim_wakes_when_the_assigner_pushes_to_it(sp: ServeProcess) -> None:
    """bob waits on a claim narrowed to "a"; the task needs "b", which bob registered too, and
    becomes available a second after it is created. The claim cannot take it and nothing announces
    it becoming due; the assigner takes it then and pushes it to bob, and that push ends bob's
    wait with the task (without the wake the claim would sleep out its 30 s and answer 204)."""
    with client(sp, "bob") as bob, client(sp, "alice") as alice, \
            client(sp, "ops", admin=True) as ops:
        registered = bob.register(capabilities=["a", "b"])

        def last_seen() -> object:
            return next(a.last_seen_at for a in ops.agents() if a.agent_id == "bob")

        async def scenario() -> httpx.Response:
            async with httpx.AsyncClient(base_url=sp.api, timeout=60) as http:
                await asyncio.sleep(1.1)  # a claim notes its agent as seen once a second at most
                claim = asyncio.create_task(http.post(
                    "/api/v1/tasks/claim", json={"capabilities": ["a"], "wait_seconds": 30},
                    headers={"X-Agent-ID": "bob"},
                ))
                while await asyncio.to_thread(last_seen) == registered.last_seen_at:
                    await asyncio.sleep(0.02)  # until the claim has looked once and waits
                due = datetime.now(UTC) + timedelta(seconds=1)
                task = await asyncio.to_thread(
                    alice.create, "needs b", required_capabilities=["b"], available_at=due)
                r = await claim
                assert r.status_code == 200, r.text
                assert r.json()["task_id"] == str(task.task_id)
                return r

        assert asyncio.run(scenario()).json()["assigned_agent"] == "bob"
