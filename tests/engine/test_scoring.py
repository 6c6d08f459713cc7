"""Eligibility and score, through the SQL assignment function and explain."""

from __future__ import annotations

from collections import Counter
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from dispatch.broker import Broker
from dispatch.models import AgentStatus, Complete, Explanation, Fail
from dispatch.settings import AssignmentSettings
from dispatch.store import Store
from tests.factories import at, make_task


async def assigned_to(broker: Broker, **task_fields: Any) -> str | None:
    """Create one task, run one assignment pass at a fixed instant, return who got it."""
    task = await make_task(broker, **task_fields)
    made = await broker.assign(now=at(1))
    assert len(made) <= 1
    return next((a.agent_id for a in made if a.task_id == task.task_id), None)


def reasons(explanation: Explanation) -> dict[str, list[str]]:
    return {c.agent_id: c.reasons for c in explanation.candidates}


async def test_ready_beats_sleeping_beats_busy(broker: Broker) -> None:
    await broker.agents.upsert("busy", status=AgentStatus.BUSY)
    await broker.agents.upsert("sleepy", status=AgentStatus.SLEEPING)
    await broker.agents.upsert("ready", status=AgentStatus.READY)
    assert await assigned_to(broker) == "ready"
    await broker.agents.drain("ready")
    assert await assigned_to(broker) == "sleepy"
    await broker.agents.drain("sleepy")
    assert await assigned_to(broker) == "busy"


async def test_score_is_availability_times_priority_weight(broker: Broker) -> None:
    await broker.agents.upsert("sleepy", status=AgentStatus.SLEEPING)
    task = await make_task(broker, priority=5)
    [made] = await broker.assign(now=at(1))
    assert made.agent_id == "sleepy"
    assert made.score == pytest.approx(0.8 * 1.5)
    assert made.wake is True
    [cand] = (await broker.explain(task.task_id)).candidates
    assert (cand.capability_match, cand.availability, cand.priority_weight) == pytest.approx(
        (1.0, 0.8, 1.5)
    )


@pytest.mark.parametrize("status", ["degraded", "stopped", "unknown"])
async def test_unavailable_agents_never_get_work(broker: Broker, status: str) -> None:
    await broker.agents.upsert("a", status=AgentStatus(status))
    task = await make_task(broker)
    assert await broker.assign(now=at(1)) == []
    explanation = await broker.explain(task.task_id)
    [cand] = explanation.candidates
    assert not cand.eligible and cand.score == 0
    assert cand.reasons == [f"status {status}"]


@pytest.mark.parametrize("status", ["ready", "sleeping", "busy"])
async def test_the_limit_holds_in_every_state(broker: Broker, status: str) -> None:
    await broker.agents.upsert("a", status=AgentStatus(status), max_concurrent=2)
    tasks = [await make_task(broker, title=f"t{i}") for i in range(3)]
    made = await broker.assign(now=at(1))
    assert [m.agent_id for m in made] == ["a", "a"]
    assert await broker.assign(now=at(2)) == []
    assert (await broker.agents.get("a")).active_tasks == 2
    left = next(t for t in tasks if t.task_id not in {m.task_id for m in made})
    explained = reasons(await broker.explain(left.task_id))
    assert explained == {"a": ["at its limit (2 of 2 tasks active)"]}


async def test_drained_agent_excluded_until_undrained(broker: Broker) -> None:
    await broker.agents.upsert("a")
    await broker.agents.drain("a")
    task = await make_task(broker)
    assert await broker.assign(now=at(1)) == []
    assert reasons(await broker.explain(task.task_id)) == {"a": ["drained"]}
    await broker.agents.drain("a", False)
    assert [m.agent_id for m in await broker.assign(now=at(2))] == ["a"]


async def test_capabilities_must_cover_the_requirement_case_insensitively(broker: Broker) -> None:
    await broker.agents.upsert("coder", capabilities=["Python", "SQL"])
    await broker.agents.upsert("writer", capabilities=["prose"])
    assert await assigned_to(broker, required_capabilities=["sql", " PYTHON "]) == "coder"
    task = await make_task(broker, required_capabilities=["python", "rust"])
    assert await broker.assign(now=at(1)) == []
    r = reasons(await broker.explain(task.task_id))
    assert r["coder"] == ["missing capabilities: rust"]
    assert r["writer"] == ["missing capabilities: python, rust"]
    assert await assigned_to(broker) in {"coder", "writer"}  # no requirement: anyone


@pytest.fixture
async def owner_broker(pool: AsyncConnectionPool[Any]) -> Broker:
    b = Broker(Store(pool), assignment=AssignmentSettings(owner_filter_enabled=True))
    await b.apply_config()
    return b


async def test_owner_filter_on(owner_broker: Broker, sql: psycopg.Connection[Any]) -> None:
    b = owner_broker
    await b.agents.upsert("alices-agent", owner="alice")
    await b.agents.upsert("device-agent")  # ownership from Alexandria (agent_owners)
    await b.agents.upsert("nobodys-agent")  # ownership unknown: fails closed
    sql.execute(
        "INSERT INTO dispatch.agent_owners (agent_id, owner) VALUES ('device-agent', 'bob')"
    )

    assert await assigned_to(b, owner="alice") == "alices-agent"
    assert await assigned_to(b, owner="bob") == "device-agent"
    task = await make_task(b, owner="carol")
    assert await b.assign(now=at(1)) == []
    explanation = await b.explain(task.task_id)
    assert explanation.owner_filter_enabled and explanation.owner_scoped
    r = reasons(explanation)
    assert r["alices-agent"] == ["belongs to alice, not to the task owner carol"]
    assert r["device-agent"] == ["belongs to bob, not to the task owner carol"]
    assert r["nobodys-agent"] == ["ownership unknown (owner filter on, task owner carol)"]


async def test_work_no_agent_can_take_is_passed_over_by_claims_and_rounds(
    owner_broker: Broker, sql: psycopg.Connection[Any]
) -> None:
    """The walk leaves out, in its own scan, what the agents at hand could not take (a capability
    none has, an owner none belongs to); what they can take behind it is found as before."""
    b = owner_broker
    await b.agents.upsert("bobs-device", capabilities=["python"])
    sql.execute("INSERT INTO dispatch.agent_owners (agent_id, owner) VALUES ('bobs-device', 'bob')")
    await b.agents.upsert("alices-agent", owner="alice", capabilities=["python", "sql"])
    await b.agents.drain("alices-agent")
    stranded = [await make_task(b, title="gpu", required_capabilities=["gpu"], priority=9),
                await make_task(b, title="carol's", owner="carol", priority=9),
                await make_task(b, title="alice's", owner="alice", priority=9)]
    bobs = await make_task(b, title="bob's", owner="bob", required_capabilities=["PYTHON"])
    anyones = await make_task(b, title="anyone's")
    claimed = await b.claim_many("bobs-device", max_tasks=5, now=at(1))
    assert [t.task_id for t in claimed] == [bobs.task_id, anyones.task_id]

    await b.agents.drain("bobs-device")
    await b.agents.drain("alices-agent", False)
    sql_sel = await make_task(b, title="sql", required_capabilities=["sql"])
    made = await b.assign(now=at(2))  # alice's agent alone has room: alice's, then sql
    assert [(m.task_id, m.agent_id) for m in made] == [
        (stranded[2].task_id, "alices-agent"), (sql_sel.task_id, "alices-agent")]
    for task in stranded[:2]:
        assert (await b.tasks.get(task.task_id)).status == "pending"


async def test_a_task_without_owner_runs_on_any_eligible_agent_on_the_defaults(
    broker: Broker,
) -> None:
    """The owner filter is on by default, and scopes only tasks that name an owner."""
    await broker.agents.upsert("alices-agent", owner="alice")
    await broker.agents.upsert("unowned-agent")
    task = await make_task(broker, requester="carol")
    assert task.owner is None
    assert len(await broker.assign(now=at(1))) == 1
    explanation = await broker.explain(task.task_id)
    assert explanation.owner_filter_enabled and not explanation.owner_scoped
    assert "not owner-scoped" in explanation.notes[0]
    # The other candidate is excluded by nothing but the task having gone.
    assert all("owner" not in " ".join(c.reasons) for c in explanation.candidates)


@pytest.fixture
async def open_broker(pool: AsyncConnectionPool[Any]) -> Broker:
    """owner_filter_enabled: false, as an operator may configure it."""
    b = Broker(Store(pool), assignment=AssignmentSettings(owner_filter_enabled=False))
    await b.apply_config()
    return b


async def test_owner_filter_off_lets_any_capable_agent_work(open_broker: Broker) -> None:
    broker = open_broker
    await broker.agents.upsert("alices-agent", owner="alice")
    task = await make_task(broker, owner="carol")
    assert [m.agent_id for m in await broker.assign(now=at(1))] == ["alices-agent"]
    explanation = await broker.explain(task.task_id)
    assert not explanation.owner_filter_enabled and not explanation.owner_scoped
    assert explanation.candidates[0].reasons == []


async def test_a_retry_avoids_the_previous_agent_unless_it_is_the_only_one(broker: Broker) -> None:
    await broker.agents.upsert("a")
    await broker.agents.upsert("b")
    task = await make_task(broker, max_retries=5)
    [first] = await broker.assign(now=at(1))
    await broker.apply(Fail(task_id=task.task_id, agent_id=first.agent_id, error="boom"), now=at(2))
    other = "b" if first.agent_id == "a" else "a"
    explanation = await broker.explain(task.task_id)
    r = reasons(explanation)
    assert r[first.agent_id] == ["attempted this task before and another agent is eligible"]
    assert explanation.candidates[0].agent_id == other
    [second] = await broker.assign(now=at(100))
    assert second.agent_id == other
    # Both have failed it now; the agent with no failures is gone: a previous agent is better than
    # nobody.
    await broker.apply(Fail(task_id=task.task_id, agent_id=other, error="boom"), now=at(101))
    await broker.agents.drain(other)
    [third] = await broker.assign(now=at(1000))
    assert third.agent_id == first.agent_id


async def test_equal_agents_share_the_load(broker: Broker) -> None:
    for name in ("a", "b", "c"):
        await broker.agents.upsert(name, max_concurrent=1000)
    # Arriving all at once: fewest active tasks first.
    for i in range(300):
        await make_task(broker, title=f"bulk {i}")
    made = []
    while batch := await broker.assign(now=at(1)):
        made += batch
    counts = Counter(m.agent_id for m in made)
    assert len(made) == 300
    assert all(90 <= counts[name] <= 110 for name in "abc"), counts
    # Arriving one by one and finished at once (everyone idle): least recently assigned first.
    rolling: Counter[str] = Counter()
    for i in range(30):
        task = await make_task(broker, title=f"rolling {i}")
        [m] = await broker.assign(now=at(2 + i))
        rolling[m.agent_id] += 1
        await broker.apply(
            Complete(task_id=task.task_id, actor=m.agent_id, result={"ok": True}), now=at(2 + i)
        )
    assert rolling == {"a": 10, "b": 10, "c": 10}
