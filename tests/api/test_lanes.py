"""Create, claim, complete, fail and the batch reports answer on lanes (dispatch.api.lane), past
the framework's per-request work: what a client sees there must be what the route's handler would
have given, headers included."""

from __future__ import annotations

from typing import Any

import httpx
from litestar.testing import AsyncTestClient
from prometheus_client import CollectorRegistry

from dispatch.api.app import create_app
from dispatch.broker import Broker
from dispatch.metrics import Metrics
from dispatch.settings import Settings
from tests.api.conftest import agent, register

ALICE = agent("alice")
BOB = agent("bob")
# Set by the server on every answer, whatever answers.
VARYING = {"content-length", "date", "server"}


async def claim(client: httpx.AsyncClient, count: int) -> list[Any]:
    r = await client.post("/api/v1/tasks/claim", headers=BOB,
                          json={"max_tasks": count, "start": True})
    assert r.status_code == 200, r.text
    tasks: list[Any] = r.json()
    assert len(tasks) == count
    return tasks


async def test_a_created_task_answers_with_its_location_and_the_anti_framing_headers(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post("/api/v1/tasks", json={"title": "t"}, headers=ALICE)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"/api/v1/tasks/{r.json()['task_id']}"
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["content-security-policy"] == "frame-ancestors 'none'"
    again = await client.post("/api/v1/tasks", json={"title": "t"},
                              headers={**ALICE, "Idempotency-Key": "k1"})
    repeat = await client.post("/api/v1/tasks", json={"title": "t"},
                               headers={**ALICE, "Idempotency-Key": "k1"})
    assert (again.status_code, repeat.status_code) == (201, 200)
    assert repeat.json() == again.json()
    assert repeat.headers["location"] == again.headers["location"]


async def test_a_claim_that_finds_nothing_is_204_without_a_body(client: httpx.AsyncClient) -> None:
    await register(client, "bob")
    r = await client.post("/api/v1/tasks/claim", json={}, headers=BOB)
    assert r.status_code == 204
    assert r.content == b""
    assert r.headers["x-frame-options"] == "DENY"


async def test_the_lane_and_the_handler_answer_alike(client: httpx.AsyncClient) -> None:
    """A lease header written as a float ("7.0", which the handler's parameter takes) is one the
    lane leaves to the handler, as it does every spelling but the plain one: the same completion
    and failure, once on each path."""
    await register(client, "bob", max_concurrent=4)
    for i in range(4):
        r = await client.post("/api/v1/tasks", json={"title": f"t{i}", "max_retries": 0},
                              headers=ALICE)
        assert r.status_code == 201, r.text
    tasks = await claim(client, 4)
    answers = []
    for task, spelling in zip(tasks, ("{}", "{}.0", "{}", "{}.0"), strict=True):
        action = "complete" if len(answers) < 2 else "fail"
        r = await client.post(
            f"/api/v1/tasks/{task['task_id']}/{action}",
            json={"result": {"n": 1}} if action == "complete" else {"error": "no"},
            headers={**BOB, "X-Dispatch-Lease": spelling.format(task["lease"])},
        )
        assert r.status_code == 200, r.text
        answers.append(r)
    for lane, handler in (answers[0:2], answers[2:4]):
        assert set(lane.headers) - VARYING == set(handler.headers) - VARYING
        assert lane.headers["content-type"] == handler.headers["content-type"]
        mine, theirs = lane.json(), handler.json()
        assert set(mine) == set(theirs)
        same = {"status", "assigned_agent", "result", "error", "retry_count", "requester"}
        assert {k: mine[k] for k in same} == {k: theirs[k] for k in same}


async def test_a_wrong_lease_on_the_lane_is_409_with_the_task(client: httpx.AsyncClient) -> None:
    await register(client, "bob")
    r = await client.post("/api/v1/tasks", json={"title": "t"}, headers=ALICE)
    assert r.status_code == 201, r.text
    (task,) = await claim(client, 1)
    r = await client.post(f"/api/v1/tasks/{task['task_id']}/complete",
                          json={"lease": task["lease"] + 1}, headers=BOB)
    assert r.status_code == 409, r.text
    assert r.json()["detail"]["status"] == "running"
    assert r.headers["x-frame-options"] == "DENY"


async def test_the_metrics_count_what_a_lane_answered_errors_included(broker: Broker) -> None:
    """dispatch_http_requests_total carries the status sent, also when an error raised on the
    lane was answered by the exception handlers (an unknown task: 404; no X-Agent-ID: 401)."""
    metrics = Metrics(CollectorRegistry())
    async with AsyncTestClient(app=create_app(Settings(), broker, metrics=metrics)) as client:
        r = await client.post("/api/v1/tasks", json={"title": "t"}, headers=ALICE)
        assert r.status_code == 201, r.text
        unknown = "00000000-0000-0000-0000-000000000001"
        r = await client.post(f"/api/v1/tasks/{unknown}/complete", json={}, headers=BOB)
        assert r.status_code == 404, r.text
        r = await client.post("/api/v1/tasks/claim", json={})
        assert r.status_code == 401, r.text

    def count(path: str, status: int) -> float | None:
        return metrics.registry.get_sample_value(
            "dispatch_http_requests_total",
            {"method": "POST", "path": path, "status_code": str(status)},
        )

    assert count("/api/v1/tasks", 201) == 1
    assert count("/api/v1/tasks/{task_id}/complete", 404) == 1
    assert count("/api/v1/tasks/claim", 401) == 1
    assert count("/api/v1/tasks/{task_id}/complete", 200) is None
