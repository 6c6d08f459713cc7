"""Leases are random tokens, not a counter: a counter rewinds when a failover loses WAL, and the
lost history's lease would then fence like the new one (tests/chaos/test_failover_async.py runs
the real failover)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from dispatch.broker import Broker
from dispatch.errors import Conflict
from dispatch.models import NewTask, Release, Start

Sql = psycopg.Connection[dict[str, Any]]
TOP = 2**31 - 1


async def test_each_assignment_draws_a_new_lease_the_old_ones_stay_refused(broker: Broker) -> None:
    await broker.agents.upsert("agent-a")
    task, _ = await broker.submit(NewTask(title="passed around"), requester="req")
    assert task.lease == 0  # never assigned
    leases = []
    for _ in range(30):
        claimed = await broker.claim("agent-a")
        assert claimed is not None and claimed.task_id == task.task_id
        leases.append(claimed.lease)
        await broker.apply(Release(task_id=task.task_id, agent_id="agent-a", lease=claimed.lease))
    assert all(1 <= lease <= TOP for lease in leases)
    # Not 1, 2, 3 ...: 30 draws from 2^31 values, all different.
    assert len(set(leases)) == len(leases) and leases != sorted(leases)
    held = await broker.claim("agent-a")
    assert held is not None and held.lease not in leases
    for old in leases:
        with pytest.raises(Conflict, match=f"lease {old} of task"):
            await broker.apply(Start(task_id=task.task_id, agent_id="agent-a", lease=old))
    started = await broker.apply(Start(task_id=task.task_id, agent_id="agent-a", lease=held.lease))
    assert started.lease == held.lease


@pytest.mark.parametrize("previous", [0, 1, 2, 1_000_000, TOP - 1, TOP])
def test_the_next_lease_is_in_range_and_never_the_previous_one(sql: Sql, previous: int) -> None:
    rows = sql.execute(
        "SELECT dispatch.lease_next(%s) AS lease FROM generate_series(1, 5000)", (previous,)
    ).fetchall()
    drawn = [r["lease"] for r in rows]
    assert previous not in drawn
    assert all(1 <= lease <= TOP for lease in drawn)
    assert len(set(drawn)) > 4990  # random, not a constant or a counter
