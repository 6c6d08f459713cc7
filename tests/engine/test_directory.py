"""The directory sync: PromptForge capabilities, Warren state and policy, Alexandria ownership, from
real loopback HTTP servers; failing services keep the last known directory; stale entries become
unknown; one replica at a time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from dispatch.broker import Broker
from dispatch.engine.directory import DIRECTORY_LOCK_KEY, DirectorySync
from dispatch.integrations.alexandria import AlexandriaClient
from dispatch.integrations.promptforge import PromptForgeClient
from dispatch.integrations.warren import WarrenClient
from dispatch.metrics import Metrics
from dispatch.models import Agent, AgentStatus, Complete
from dispatch.settings import AssignmentSettings
from dispatch.store import Store
from tests.factories import at, make_task
from tests.fakes import FakeAlexandria, FakePromptForge, FakeWarren

STALE_MS = 60_000


@pytest.fixture
async def owner_broker(pool: AsyncConnectionPool[Any]) -> Broker:
    b = Broker(Store(pool), assignment=AssignmentSettings(owner_filter_enabled=True))
    await b.apply_config()
    return b


@pytest.fixture
async def sync(
    owner_broker: Broker,
    warren: FakeWarren,
    promptforge: FakePromptForge,
    alexandria: FakeAlexandria,
) -> AsyncIterator[DirectorySync]:
    warren.set("coder", "ready", "always-on")
    warren.set("writer", "sleeping", "on-demand")
    promptforge.personas = {"coder": ["python", "sql"], "writer": ["prose"]}
    promptforge.other_prompts = ["not-an-agent"]
    alexandria.own("alice", name="coder")
    alexandria.own("bob", identifier="writer")
    ds = DirectorySync(
        owner_broker,
        warren=WarrenClient(warren.url),
        promptforge=PromptForgeClient(promptforge.url),
        alexandria=AlexandriaClient(alexandria.url),
        stale_ms=STALE_MS,
        metrics=Metrics(),
    )
    yield ds
    await ds.stop()


async def directory(broker: Broker) -> dict[str, Agent]:
    return {a.agent_id: a for a in await broker.agents.all()}


async def test_the_directory_comes_from_the_three_services(
    sync: DirectorySync, owner_broker: Broker, alexandria: FakeAlexandria
) -> None:
    assert await sync.run_once(now=at(0))
    d = await directory(owner_broker)
    assert set(d) == {"coder", "writer"}
    assert (d["coder"].capabilities, d["coder"].status, d["coder"].policy, d["coder"].source) == (
        ["python", "sql"], AgentStatus.READY, "always-on", "warren",
    )
    assert (d["writer"].capabilities, d["writer"].status) == (["prose"], AgentStatus.SLEEPING)
    assert sync.health() == {
        "directory": "ok", "warren": "ok", "promptforge": "ok", "alexandria": "ok",
    }
    # Alexandria was asked as dispatch.
    assert all(r[2].get("X-Agent-ID") == "dispatch" for r in alexandria.requests)

    # Ownership from Alexandria drives the owner filter; capabilities from PromptForge.
    mine = await make_task(owner_broker, owner="alice", required_capabilities=["SQL"])
    bobs = await make_task(owner_broker, owner="bob", required_capabilities=["prose"])
    carols = await make_task(owner_broker, owner="carol")
    made = {m.task_id: m for m in await owner_broker.assign(now=at(1))}
    assert made[mine.task_id].agent_id == "coder"
    assert (made[bobs.task_id].agent_id, made[bobs.task_id].wake) == ("writer", True)
    assert carols.task_id not in made


async def test_warren_down_keeps_the_last_known_directory_until_it_goes_stale(
    sync: DirectorySync, owner_broker: Broker, warren: FakeWarren
) -> None:
    await sync.run_once(now=at(0))
    warren.down = True
    warren.set("coder", "degraded")  # nobody can know: Warren does not answer
    await sync.run_once(now=at(30))
    d = await directory(owner_broker)
    assert (d["coder"].status, d["writer"].status) == (AgentStatus.READY, AgentStatus.SLEEPING)
    assert sync.health()["warren"] == "down: HTTP 503"
    assert sync.health()["promptforge"] == "ok"
    assert sync._failures is not None
    assert sync._failures.labels(service="warren")._value.get() == 1

    # Still assignable while the last known state is fresh.
    task = await make_task(owner_broker, owner="alice")
    assert [m.agent_id for m in await owner_broker.assign(now=at(31))] == ["coder"]
    await owner_broker.apply(
        Complete(task_id=task.task_id, actor="coder", result={"ok": True}), now=at(32)
    )

    await sync.run_once(now=at(61))  # nothing refreshed for longer than stale_ms
    d = await directory(owner_broker)
    assert (d["coder"].status, d["writer"].status) == (AgentStatus.UNKNOWN, AgentStatus.UNKNOWN)
    await make_task(owner_broker, owner="alice")
    assert await owner_broker.assign(now=at(62)) == []

    warren.down = False
    await sync.run_once(now=at(70))
    d = await directory(owner_broker)
    assert (d["coder"].status, d["writer"].status) == (AgentStatus.DEGRADED, AgentStatus.SLEEPING)
    assert sync.health()["warren"] == "ok"


async def test_promptforge_down_keeps_the_capabilities(
    sync: DirectorySync, owner_broker: Broker, promptforge: FakePromptForge, warren: FakeWarren
) -> None:
    await sync.run_once(now=at(0))
    promptforge.down = True
    warren.set("writer", "ready")
    await sync.run_once(now=at(5))
    d = await directory(owner_broker)
    assert d["coder"].capabilities == ["python", "sql"]
    assert (d["writer"].capabilities, d["writer"].status) == (["prose"], AgentStatus.READY)
    assert sync.health()["promptforge"] == "down: HTTP 503"
    promptforge.down = False
    promptforge.personas["writer"] = ["prose", "translation"]
    await sync.run_once(now=at(6))
    assert (await directory(owner_broker))["writer"].capabilities == ["prose", "translation"]


async def test_alexandria_down_keeps_ownership_then_fails_closed(
    sync: DirectorySync, owner_broker: Broker, alexandria: FakeAlexandria
) -> None:
    await sync.run_once(now=at(0))
    alexandria.down = True
    await sync.run_once(now=at(30))
    task = await make_task(owner_broker, owner="alice")
    assert [m.agent_id for m in await owner_broker.assign(now=at(31))] == ["coder"]
    await owner_broker.apply(Complete(task_id=task.task_id, actor="coder", result={}), now=at(32))

    await sync.run_once(now=at(61))  # Warren still answers, but ownership is too old to trust
    task = await make_task(owner_broker, owner="alice")
    assert await owner_broker.assign(now=at(62)) == []
    reasons = {c.agent_id: c.reasons for c in (await owner_broker.explain(task.task_id)).candidates}
    assert reasons["coder"] == ["ownership unknown (owner filter on, task owner alice)"]


async def test_only_one_replica_refreshes_at_a_time(
    sync: DirectorySync, db_url: str, warren: FakeWarren, owner_broker: Broker
) -> None:
    with psycopg.connect(db_url, autocommit=True) as other_replica:
        other_replica.execute("SELECT pg_advisory_lock(%s)", (DIRECTORY_LOCK_KEY,))
        assert await sync.run_once() is False
        assert warren.requests == []  # no HTTP either: the holder does the refresh
        assert await directory(owner_broker) == {}
        other_replica.execute("SELECT pg_advisory_unlock(%s)", (DIRECTORY_LOCK_KEY,))
    assert await sync.run_once() is True
    assert set(await directory(owner_broker)) == {"coder", "writer"}


async def test_registry_agents_go_stale_without_heartbeats_and_come_back(broker: Broker) -> None:
    ds = DirectorySync(broker, stale_ms=STALE_MS)
    await broker.agents.upsert("reg", capabilities=["x"], now=at(0))
    await ds.run_once(now=at(59))
    assert (await broker.agents.get("reg")).status is AgentStatus.READY
    await ds.run_once(now=at(61))
    assert (await broker.agents.get("reg")).status is AgentStatus.UNKNOWN
    await broker.agents.heartbeat("reg", now=at(62))
    agent = await broker.agents.get("reg")
    assert (agent.status, agent.source) == (AgentStatus.READY, "registry")
    assert ds.health()["warren"] == "disabled"
