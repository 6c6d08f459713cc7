"""Flow control over REST: the task fields, the admin endpoints for caps, buckets and weights,
explain naming the rule that holds a task back, bad input refused with nothing written."""

from __future__ import annotations

from typing import Any

import httpx
import psycopg
import pytest

from tests.api.conftest import admin, agent

Conn = psycopg.Connection[dict[str, Any]]


def flow_rows(sql: Conn) -> int:
    row = sql.execute(
        "SELECT (SELECT count(*) FROM dispatch.tasks) + (SELECT count(*) FROM"
        " dispatch.tenant_weights) + (SELECT count(*) FROM dispatch.concurrency_limits)"
        " + (SELECT count(*) FROM dispatch.rate_limits) AS n").fetchone()
    assert row is not None
    return int(row["n"])


async def test_a_task_carries_its_flow_fields(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/v1/tasks", headers=agent(), json={
        "title": "t", "concurrency_key": "repo-x", "rate_key": "openai", "cost": 30})
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["concurrency_key"], body["rate_key"], body["cost"]) == ("repo-x", "openai", 30)
    plain = (await client.post("/api/v1/tasks", headers=agent(), json={"title": "u"})).json()
    assert (plain["concurrency_key"], plain["rate_key"], plain["cost"]) == (None, None, 1)


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("POST", "/api/v1/tasks", {"title": "t", "cost": 0}, "cost"),
        ("POST", "/api/v1/tasks", {"title": "t", "cost": 1_000_000_001}, "cost"),
        ("POST", "/api/v1/tasks", {"title": "t", "concurrency_key": ""}, "concurrency_key"),
        ("POST", "/api/v1/tasks", {"title": "t", "rate_key": "x" * 257}, "rate_key"),
        ("PUT", "/api/v1/limits/concurrency/k", {"max_active": -1}, "max_active"),
        ("PUT", "/api/v1/limits/concurrency/k", {}, "max_active"),
        ("PUT", "/api/v1/limits/concurrency/k", {"max_active": 3, "extra": 1}, "extra"),
        ("PUT", "/api/v1/limits/rate/k", {"capacity": 0, "refill_per_second": 1}, "capacity"),
        ("PUT", "/api/v1/limits/rate/k", {"capacity": 5, "refill_per_second": 0},
         "refill_per_second"),
        ("PUT", f"/api/v1/limits/rate/{'k' * 257}", {"capacity": 5, "refill_per_second": 1},
         "key"),
        ("PUT", "/api/v1/tenants/alice/weight", {"weight": 0}, "weight"),
        ("PUT", "/api/v1/tenants/alice/weight", {"weight": 1001}, "weight"),
        # Values that used to be taken and then broke other work (an overflowing wait or place in
        # line): refused with the field named.
        ("PUT", "/api/v1/limits/rate/trickle", {"capacity": 1, "refill_per_second": 1e-300},
         "refill_per_second"),
        ("PUT", "/api/v1/limits/rate/k", {"capacity": 1e12, "refill_per_second": 1},
         "refill_per_second"),
        ("PUT", "/api/v1/limits/rate/k", {"capacity": 1000, "refill_per_second": 9.9e-7},
         "refill_per_second"),
        ("PUT", "/api/v1/limits/rate/k", {"capacity": 1e13, "refill_per_second": 1e12},
         "capacity"),
        ("PUT", "/api/v1/limits/rate/k", {"capacity": 5, "refill_per_second": 1e13},
         "refill_per_second"),
        ("PUT", "/api/v1/limits/concurrency/k", {"max_active": 1_000_001}, "max_active"),
        ("PUT", "/api/v1/tenants/alice/weight", {"weight": 1e-12}, "weight"),
        ("PUT", "/api/v1/tenants/alice/weight", {"weight": 1e-300}, "weight"),
        ("PUT", "/api/v1/tenants/alice/weight", {"weight": 5e-324}, "weight"),
        ("PUT", "/api/v1/tenants/alice/weight", {"weight": 0.000999}, "weight"),
    ],
)
async def test_bad_flow_input_is_400_and_writes_nothing(
    client: httpx.AsyncClient, sql: Conn, method: str, path: str, body: object, field: str
) -> None:
    r = await client.request(method, path, headers=admin(), json=body)
    assert r.status_code == 400, r.text
    assert field in r.text
    assert flow_rows(sql) == 0


async def test_a_bad_value_leaves_the_bucket_and_the_weight_as_they_were(
    client: httpx.AsyncClient
) -> None:
    bucket, weight = "/api/v1/limits/rate/trickle", "/api/v1/tenants/alice/weight"
    r = await client.put(bucket, headers=admin(), json={"capacity": 10, "refill_per_second": 2})
    assert r.status_code == 200, r.text
    assert (await client.put(weight, headers=admin(), json={"weight": 3})).status_code == 200
    for path, body, field in (
            (bucket, {"capacity": 1, "refill_per_second": 1e-300}, "refill_per_second"),
            (bucket, {"capacity": 1e10, "refill_per_second": 2}, "refill_per_second"),
            (weight, {"weight": 5e-324}, "weight")):
        r = await client.put(path, headers=admin(), json=body)
        assert r.status_code == 400 and r.json()["detail"]["field"] == field, r.text
    got = (await client.get(bucket, headers=admin())).json()
    assert (got["capacity"], got["refill_per_second"]) == (10, 2)
    assert (await client.get(weight, headers=admin())).json()["weight"] == 3


async def test_with_the_slowest_bucket_and_lightest_tenant_other_work_flows(
    client: httpx.AsyncClient
) -> None:
    """The most extreme values taken: a bucket that fills in 1e9 s and a tenant of weight 0.001.
    The task the bucket holds back is explained, claims reach past it, other tasks are assigned."""
    r = await client.put("/api/v1/limits/rate/trickle", headers=admin(),
                         json={"capacity": 1, "refill_per_second": 1e-9})
    assert r.status_code == 200, r.text
    r = await client.put("/api/v1/tenants/alice/weight", headers=admin(), json={"weight": 0.001})
    assert r.status_code == 200, r.text
    await client.put("/api/v1/agents/w", headers=agent("w"), json={"max_concurrent": 10})
    ids = []
    for body in ({"rate_key": "trickle"}, {"rate_key": "trickle"}, {}, {}):
        r = await client.post("/api/v1/tasks", headers=agent(), json={"title": "t", **body})
        assert r.status_code == 201, r.text
        ids.append(r.json()["task_id"])
    bob = (await client.post("/api/v1/tasks", headers=agent("bob"), json={"title": "b"})).json()
    claimed = await client.post("/api/v1/tasks/claim", headers=agent("w"), json={"max_tasks": 10})
    assert claimed.status_code == 200, claimed.text
    assert {t["task_id"] for t in claimed.json()} == {ids[0], ids[2], ids[3], bob["task_id"]}
    r = await client.get(f"/api/v1/tasks/{ids[1]}/explain", headers=admin())
    assert r.status_code == 200, r.text
    assert any(h.startswith("rate key trickle empty until 20") for h in r.json()["held_back"])


async def test_a_cost_its_bucket_can_never_hold_is_400_and_writes_nothing(
    client: httpx.AsyncClient, sql: Conn
) -> None:
    r = await client.put("/api/v1/limits/rate/openai", headers=admin(),
                         json={"capacity": 5, "refill_per_second": 1})
    assert r.status_code == 200, r.text
    r = await client.post("/api/v1/tasks", headers=agent(),
                          json={"title": "t", "rate_key": "openai", "cost": 6})
    assert r.status_code == 400, r.text
    assert "cost 6 exceeds the capacity 5 of rate key openai" in r.text and "cost" in r.text
    assert flow_rows(sql) == 1  # the bucket, no task
    r = await client.post("/api/v1/tasks", headers=agent(),
                          json={"title": "t", "rate_key": "openai", "cost": 5})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/limits/concurrency"),
        ("PUT", "/api/v1/limits/concurrency/k"),
        ("DELETE", "/api/v1/limits/rate/k"),
        ("GET", "/api/v1/tenants/alice/weight"),
        ("PUT", "/api/v1/tenants/alice/weight"),
    ],
)
async def test_the_flow_endpoints_are_for_admins(
    client: httpx.AsyncClient, sql: Conn, method: str, path: str
) -> None:
    r = await client.request(method, path, headers=agent(), json={"max_active": 1, "weight": 2})
    assert r.status_code == 401, r.text
    r = await client.request(method, path, headers={**agent(), "Authorization": "Bearer no"},
                             json={"max_active": 1, "weight": 2})
    assert r.status_code == 403, r.text
    assert flow_rows(sql) == 0


async def test_caps_buckets_and_weights_are_set_read_and_removed(
    client: httpx.AsyncClient,
) -> None:
    base = "/api/v1/limits"
    r = await client.put(f"{base}/concurrency/repo-x", headers=admin(), json={"max_active": 3})
    assert r.status_code == 200, r.text
    assert r.json()["max_active"] == 3 and r.json()["active_tasks"] == 0
    r = await client.get(f"{base}/concurrency/repo-x", headers=admin())
    assert r.status_code == 200 and r.json()["key"] == "repo-x"
    assert [x["key"] for x in (await client.get(f"{base}/concurrency", headers=admin())).json()] \
        == ["repo-x"]
    assert (await client.delete(f"{base}/concurrency/repo-x", headers=admin())).status_code == 204
    assert (await client.get(f"{base}/concurrency/repo-x", headers=admin())).status_code == 404
    assert (await client.delete(f"{base}/concurrency/repo-x", headers=admin())).status_code == 404

    r = await client.put(f"{base}/rate/openai", headers=admin(),
                         json={"capacity": 60, "refill_per_second": 1})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == pytest.approx(60)
    r = await client.get(f"{base}/rate/openai", headers=admin())
    assert r.status_code == 200 and r.json()["capacity"] == 60
    assert len((await client.get(f"{base}/rate", headers=admin())).json()) == 1
    assert (await client.delete(f"{base}/rate/openai", headers=admin())).status_code == 204
    assert (await client.get(f"{base}/rate/openai", headers=admin())).status_code == 404

    weight = "/api/v1/tenants/alice/weight"
    assert (await client.get(weight, headers=admin())).json() == {
        "tenant": "alice", "weight": 1.0, "default": True}
    r = await client.put(weight, headers=admin(), json={"weight": 2.5})
    assert r.status_code == 200 and r.json()["weight"] == 2.5
    assert (await client.get(weight, headers=admin())).json() == {
        "tenant": "alice", "weight": 2.5, "default": False}
    assert (await client.delete(weight, headers=admin())).status_code == 204
    assert (await client.get(weight, headers=admin())).json()["default"] is True


async def test_explain_names_the_rule_holding_a_task_back(
    client: httpx.AsyncClient, sql: Conn
) -> None:
    await client.put("/api/v1/limits/concurrency/repo-x", headers=admin(), json={"max_active": 1})
    await client.put("/api/v1/limits/rate/openai", headers=admin(),
                     json={"capacity": 1, "refill_per_second": 0.001})
    await client.put("/api/v1/agents/w", headers=agent("w"), json={"max_concurrent": 10})
    ids = []
    for body in ({"concurrency_key": "repo-x"}, {"concurrency_key": "repo-x"},
                 {"rate_key": "openai"}, {"rate_key": "openai"}):
        r = await client.post("/api/v1/tasks", headers=agent(), json={"title": "t", **body})
        ids.append(r.json()["task_id"])
    claimed = await client.post("/api/v1/tasks/claim", headers=agent("w"),
                                json={"max_tasks": 10})
    assert {t["task_id"] for t in claimed.json()} == {ids[0], ids[2]}
    held = (await client.get(f"/api/v1/tasks/{ids[1]}/explain", headers=admin())).json()
    assert "concurrency key repo-x at 1/1" in held["held_back"]
    assert held["tenant"] == "alice" and held["effective_priority"] == 0
    held = (await client.get(f"/api/v1/tasks/{ids[3]}/explain", headers=admin())).json()
    assert any(h.startswith("rate key openai empty until ") for h in held["held_back"]), held
    # The second of alice's tasks with a key was also placed after her first: fair share.
    assert any("tenant alice's fair share" in h for h in held["held_back"]), held
