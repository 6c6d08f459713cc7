"""The pending queue by capability and by tenant (dispatch.pending_by): what the metrics, the stats
and the dashboard's overview show of which skill is short of agents, bounded to the largest keys
and `other`."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from dispatch.broker import Broker
from dispatch.metrics import OTHER, Metrics
from tests.factories import at, make_task

Sql = psycopg.Connection[dict[str, Any]]


def by(sql: Sql, dimension: str, top: int = 20) -> dict[str, tuple[Any, ...]]:
    rows = sql.execute(
        "SELECT * FROM dispatch.pending_by(%s, %s, %s)", (dimension, top, at(60))
    ).fetchall()
    return {r["key"]: (r["pending"], r["ready"], r["oldest_wait_seconds"], r["agents"])
            for r in rows}


async def test_pending_by_capability_with_the_agents_that_have_it(
    broker: Broker, sql: Sql
) -> None:
    for _ in range(3):
        await make_task(broker, required_capabilities=["gpu"])
    for _ in range(2):
        await make_task(broker, required_capabilities=["gpu", "cuda"], available_at=at(30))
    await make_task(broker, required_capabilities=["gpu"], available_at=at(3600))  # scheduled
    await make_task(broker)
    await broker.agents.upsert("a1", capabilities=["gpu"])
    await broker.agents.upsert("a2", capabilities=["gpu", "cuda"])
    await broker.agents.upsert("a3", capabilities=["gpu"])
    await broker.agents.drain("a3")

    assert by(sql, "capability") == {
        "gpu": (6, 5, 60.0, 2),  # the scheduled one is pending, not ready; a3 is drained
        "cuda": (2, 2, 30.0, 1),
        "(any)": (1, 1, 60.0, 2),
    }
    # Bounded: the largest, then the rest as `other`, whose agents are not counted.
    assert by(sql, "capability", top=1) == {"gpu": (6, 5, 60.0, 2), OTHER: (3, 3, 60.0, None)}
    with pytest.raises(psycopg.Error) as err:
        sql.execute("SELECT * FROM dispatch.pending_by('color')")
    assert err.value.sqlstate == "UD400"


async def test_stats_and_gauges_show_tenants_only_while_flow_control_is_on(
    broker: Broker,
) -> None:
    await make_task(broker, requester="alice", required_capabilities=["gpu"])
    await make_task(broker, requester="bob", owner="carol")
    stats = await broker.insights.stats()
    assert [(q.key, q.pending) for q in stats.by_capability] == [("(any)", 1), ("gpu", 1)]
    assert stats.by_tenant is None
    gauges = await broker.insights.metrics_gauges()
    assert gauges["by_tenant"] is None and len(gauges["by_capability"]) == 2

    await broker.flow.tenant_weight_set("alice", 2)
    stats = await broker.insights.stats()
    assert stats.by_tenant is not None
    assert sorted((q.key, q.pending) for q in stats.by_tenant) == [("alice", 1), ("carol", 1)]


def test_the_assignment_wait_has_a_bounded_capability_label() -> None:
    metrics = Metrics()
    for i in range(30):
        metrics.waited([f"skill-{i}"], 0.5)
    metrics.waited([], 0.1)
    metrics.waited(["skill-0", "skill-29"], 0.2)

    def count(capability: str) -> float:
        value = metrics.registry.get_sample_value(
            "dispatch_assignment_wait_seconds_count", {"capability": capability}
        )
        return value or 0.0

    assert count("skill-0") == 2 and count("skill-19") == 1
    assert count("skill-20") == 0 and count(OTHER) == 10 + 1 + 1  # skill-20..29, (any), skill-29
    assert count("(any)") == 0  # it came after the first 20 had their series
