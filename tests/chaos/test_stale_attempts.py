"""Stale attempts against a real `dispatch serve`: agents that hold tasks past their 1 s timeout,
get them again, and then report late on the attempt they lost, with its lease, while others report
on time. No late report may become a task's result or end a task: every completed task's result
names the task's final lease, every task ends once, and each agent's active tasks hold slots of
their own, within its limit. (This test sets retry_backoff_ms 0 so retries come back at once.)"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.rows import dict_row

from dispatch.db import CONNECT_KWARGS
from tests.serve import serving

AGENTS = ("late-1", "late-2", "late-3")
TASKS = 40


async def agent_loop(
    api: str, agent_id: str, stop: asyncio.Event, log: list[tuple[str, str, int, int, str]]
) -> None:
    """Claim, then report: on time (complete), or after the timeout (complete, or fail for good),
    always naming the lease the task came with."""
    rng = random.Random(agent_id)
    headers = {"X-Agent-ID": agent_id}
    async with httpx.AsyncClient(base_url=api, headers=headers, timeout=30) as http:
        r = await http.put(f"/api/v1/agents/{agent_id}",
                           json={"capabilities": ["c"], "max_concurrent": 5})
        assert r.status_code == 200

        async def work(task: dict[str, Any]) -> None:
            lease, tid = task["lease"], task["task_id"]
            late = rng.random() < 0.6
            if late:
                await asyncio.sleep(1.3 + rng.random())  # past the 1 s timeout
            if late and rng.random() < 0.5:
                action, body = "fail", {"error": "late", "retry_eligible": False, "lease": lease}
            else:
                action = "complete"
                body = {"result": {"agent": agent_id, "lease": lease}, "lease": lease}
            r = await http.post(f"/api/v1/tasks/{tid}/{action}", json=body)
            assert r.status_code in (200, 409), r.text
            log.append((tid, action, lease, r.status_code, agent_id))

        running: set[asyncio.Task[None]] = set()
        seen: set[tuple[str, int]] = set()
        while not stop.is_set():
            r = await http.post("/api/v1/tasks/claim",
                                json={"wait_seconds": 0.5, "max_tasks": 5, "start": True})
            assert r.status_code in (200, 204), r.text
            tasks = r.json() if r.status_code == 200 else []
            # The assigner pushes to registered agents too: take up what it gave this one.
            pushed = await http.get("/api/v1/tasks",
                                    params={"assignee": agent_id, "status": "assigned"})
            for task in pushed.json():
                r = await http.post(f"/api/v1/tasks/{task['task_id']}/start",
                                    json={"lease": task["lease"]})
                if r.status_code == 200:
                    tasks.append(r.json())
            for task in tasks:
                if (task["task_id"], task["lease"]) in seen:
                    continue
                seen.add((task["task_id"], task["lease"]))
                t = asyncio.create_task(work(task))
                running.add(t)
                t.add_done_callback(running.discard)
        await asyncio.gather(*running)


def test_late_reports_of_lost_attempts_never_count(db_url: str, tmp_path: Path) -> None:
    with serving(db_url, tmp_path, env={"DISPATCH_RETRY_BACKOFF_MS": "0"}) as sp:
        with httpx.Client(base_url=sp.api, headers={"X-Agent-ID": "req"}) as http:
            for i in range(TASKS):
                r = http.post("/api/v1/tasks", json={"title": f"t{i}", "scope": "c",
                                                     "timeout_seconds": 1, "max_retries": 100})
                assert r.status_code == 201

        log: list[tuple[str, str, int, int, str]] = []

        async def run() -> None:
            stop = asyncio.Event()
            agents = [asyncio.create_task(agent_loop(sp.api, a, stop, log)) for a in AGENTS]

            def unfinished() -> int:
                with psycopg.connect(db_url, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
                    row = conn.execute(
                        "SELECT count(*) FROM dispatch.tasks WHERE status NOT IN"
                        " ('completed', 'failed')"
                    ).fetchone()
                assert row is not None
                return int(row[0])

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 120
            while await asyncio.to_thread(unfinished) and loop.time() < deadline:
                await asyncio.sleep(0.2)
            stop.set()
            await asyncio.gather(*agents)

        asyncio.run(run())

    stale = [entry for entry in log if entry[3] == 409]
    assert stale, "no report was late: the test did not exercise stale attempts"
    with psycopg.connect(db_url, row_factory=dict_row, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
        tasks = {str(t["task_id"]): t for t in conn.execute("SELECT * FROM dispatch.tasks")}
        ends = Counter(
            str(e["task_id"]) for e in conn.execute(
                "SELECT task_id FROM dispatch.task_events WHERE event IN ('completed', 'dlq')"
            )
        )
        drift = conn.execute(
            "SELECT agent_id, active_tasks, slots_held FROM dispatch.agent_load"
            " WHERE active_tasks <> slots_held OR active_tasks > max_concurrent"
        ).fetchall()
    assert len(tasks) == TASKS
    assert all(t["status"] in ("completed", "failed") for t in tasks.values())
    assert all(n == 1 for n in ends.values()) and len(ends) == TASKS, ends
    accepted = {(tid, lease): (action, agent) for tid, action, lease, code, agent in log
                if code == 200}
    for tid, task in tasks.items():
        final = accepted.get((tid, task["lease"]))
        assert final is not None, f"task {tid} ended without a report on its final lease"
        if task["status"] == "completed":
            assert task["result"] == {"agent": final[1], "lease": task["lease"]}
        else:
            assert final[0] == "fail" and task["error"] == "late"
    # Every accepted report named the task's final lease: earlier leases were all refused.
    for (tid, lease) in accepted:
        assert lease == tasks[tid]["lease"], (tid, lease, tasks[tid]["lease"])
    assert drift == []
