"""Following a task live against a real `dispatch serve`: GET /api/v1/tasks/{id}/stream through
the client (sync and async), each progress chunk arriving while the task still runs, resumption
after the last event seen, and the end of the stream when the task ends."""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid

import httpx
import pytest

from dispatch.errors import NotFound
from dispatch.models import TaskEvent
from dispatch.sdk.client import AsyncDispatchClient, DispatchClient
from tests.serve import ServeProcess

WAIT = 30.0


def running(sp: ServeProcess, title: str) -> tuple[uuid.UUID, int]:
    with DispatchClient(sp.api, "alice") as alice, DispatchClient(sp.api, "writer") as w:
        task = alice.create(title, required_capabilities=["write"])
        w.register(capabilities=["write"])
        [mine] = w.claim_many(1, wait_seconds=10, start=True)
        assert mine.task_id == task.task_id
        return task.task_id, mine.lease


def test_progress_chunks_reach_the_follower_as_they_are_written(sp: ServeProcess) -> None:
    task_id, lease = running(sp, "write a poem")
    seen: queue.Queue[TaskEvent | None] = queue.Queue()

    def follow() -> None:
        with DispatchClient(sp.api, "alice") as alice:
            for event in alice.follow(task_id):
                seen.put(event)
        seen.put(None)

    threading.Thread(target=follow, daemon=True).start()
    history = [seen.get(timeout=WAIT).event for _ in range(3)]  # type: ignore[union-attr]
    assert history == ["created", "assigned", "started"]
    with DispatchClient(sp.api, "writer") as w:
        for chunk in ("Roses ", "are ", "red"):
            w.progress(task_id, None, None, data={"text": chunk}, lease=lease)
            # Each chunk arrives while the task is still running.
            event = seen.get(timeout=WAIT)
            assert event is not None and event.event == "progress"
            assert event.payload["data"] == {"text": chunk}
        w.complete(task_id, {"poem": "Roses are red"}, lease=lease)
    assert seen.get(timeout=WAIT).event == "completed"  # type: ignore[union-attr]
    assert seen.get(timeout=WAIT) is None  # the stream ended with the task


async def test_a_follower_resumes_after_the_last_event_it_saw(sp: ServeProcess) -> None:
    task_id, lease = running(sp, "resumable")
    async with AsyncDispatchClient(sp.api, "alice") as alice:
        events = await alice.events(task_id)
        with DispatchClient(sp.api, "writer") as w:
            w.progress(task_id, 50, "half", None, lease=lease)
            w.complete(task_id, "done", lease=lease)
        got = [e async for e in alice.follow(task_id, after=events[-1].id)]
        assert [e.event for e in got] == ["progress", "completed"]
        # The raw stream: Last-Event-ID resumes the same way; the end names the status.
        async with httpx.AsyncClient(base_url=sp.api, timeout=WAIT) as http:
            r = await http.get(f"/api/v1/tasks/{task_id}/stream",
                               headers={"X-Agent-ID": "alice", "Last-Event-ID": str(got[0].id)})
            assert r.status_code == 200 and r.headers["content-type"].startswith(
                "text/event-stream")
            text = r.text.replace("\r\n", "\n")
            assert "event: completed" in text and "event: progress" not in text
            assert text.rstrip().endswith("event: end\ndata: completed")
            r = await http.get(f"/api/v1/tasks/{task_id}/stream",
                               headers={"X-Agent-ID": "alice", "Last-Event-ID": "x"})
            assert r.status_code == 400


async def test_following_an_unknown_task_is_404(sp: ServeProcess) -> None:
    async with AsyncDispatchClient(sp.api, "alice") as alice:
        with pytest.raises(NotFound):
            async with asyncio.timeout(WAIT):
                async for _ in alice.follow(uuid.uuid4()):
                    pass
