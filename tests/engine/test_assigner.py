"""The assigner loop: NOTIFY wake-up, scheduled work, metrics, waking sleeping agents via Warren."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from dispatch.broker import Broker
from dispatch.engine.assigner import Assigner, Waker
from dispatch.engine.reaper import Reaper
from dispatch.integrations.warren import WarrenClient
from dispatch.metrics import Metrics
from dispatch.models import AgentStatus, Complete, NewTask, NextClaim, TaskStatus
from dispatch.notify import Listener
from dispatch.settings import AssignmentSettings
from dispatch.store import Store
from tests.fakes import FakeWarren

SLOW_TICK_MS = 60_000  # no assignment in these tests can come from the fallback tick


async def submit(broker: Broker, **fields: Any) -> uuid.UUID:
    task, _ = await broker.submit(NewTask(title="t", **fields), requester="req")
    return task.task_id


async def settled(assigner: Assigner) -> int:
    """The assigner's round count once no round has run for 0.3 s."""
    while True:
        rounds = assigner.rounds
        await asyncio.sleep(0.3)
        if assigner.rounds == rounds:
            return rounds


async def test_new_task_reaches_an_idle_agent_without_waiting_for_the_tick(
    broker: Broker, listener: Listener
) -> None:
    await broker.agents.upsert("idle")
    assigner = Assigner(broker, listener, tick_interval_ms=SLOW_TICK_MS)
    await assigner.start()
    try:
        await assigner.wait_until(lambda a: a.rounds >= 1, 5)
        task_id = await submit(broker)
        # Woken by NOTIFY: well before the 60 s tick could have fired.
        await assigner.wait_until(lambda a: a.assigned >= 1, 5)
        task = await broker.tasks.get(task_id)
        assert (task.status, task.assigned_agent) == (TaskStatus.ASSIGNED, "idle")
    finally:
        await assigner.stop()


async def test_freed_capacity_wakes_the_assigner(broker: Broker, listener: Listener) -> None:
    await broker.agents.upsert("solo", max_concurrent=1)
    first = await submit(broker)
    second = await submit(broker)
    assigner = Assigner(broker, listener, tick_interval_ms=SLOW_TICK_MS)
    await assigner.start()
    try:
        await assigner.wait_until(lambda a: a.assigned >= 1, 5)
        assert (await broker.tasks.get(first)).assigned_agent == "solo"
        assert (await broker.tasks.get(second)).status is TaskStatus.PENDING
        await broker.apply(Complete(task_id=first, actor="solo", result={"done": True}))
        await assigner.wait_until(lambda a: a.assigned >= 2, 5)
        assert (await broker.tasks.get(second)).assigned_agent == "solo"
    finally:
        await assigner.stop()


@contextlib.asynccontextmanager
async def heard(db_url: str, channel: str) -> AsyncIterator[list[str]]:
    """The payloads of the NOTIFYs on channel while the block runs (and 0.3 s after it), as
    another replica's listener hears them."""
    payloads: list[str] = []
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(f"LISTEN {channel}")

        async def collect() -> None:
            async for note in conn.notifies():
                payloads.append(note.payload)

        task = asyncio.create_task(collect())
        try:
            yield payloads
            await asyncio.sleep(0.3)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_work_made_here_wakes_this_assigner_without_a_notify(
    broker: Broker, listener: Listener, db_url: str
) -> None:
    """A task this process creates, and the slot its agent's completion frees when the next
    claim in it takes nothing, wake this process's assigner directly, even one that NOTIFY
    dispatch_work does not wake (the fanout chose another worker's): no NOTIFY, which every
    replica's listener would read in a transaction of its own."""
    listener.wakes_assigner = False  # dispatch_work wakes another worker's assigner, not this one
    await broker.agents.upsert("solo", max_concurrent=1)
    assigner = Assigner(broker, listener, tick_interval_ms=SLOW_TICK_MS)
    await assigner.start()
    try:
        await assigner.wait_until(lambda a: a.rounds >= 1, 5)
        async with heard(db_url, "dispatch_work") as payloads:
            first = await submit(broker)
            await assigner.wait_until(lambda a: a.assigned >= 1, 5)  # not the 60 s tick
            await submit(broker, required_capabilities=["gpu"])  # nobody can take it
            rounds = await settled(assigner)  # the last found solo full, work waiting
            # solo completes and its next claim finds nothing it can take: the slot is free.
            _, following = await broker.apply_then_claim(
                Complete(task_id=first, actor="solo", result={}), "solo", NextClaim())
            assert following == []
            await assigner.wait_until(lambda a: a.rounds > rounds, 5)
            # Hence the next new task is not left for the tick as one behind full agents.
            third = await submit(broker)
            await assigner.wait_until(lambda a: a.assigned >= 2, 5)
            assert (await broker.tasks.get(third)).assigned_agent == "solo"
        assert payloads == []
        # Without the assigner, the same work is announced by NOTIFY, as a DBA's would be.
        await assigner.stop()
        async with heard(db_url, "dispatch_work") as payloads:
            await submit(broker)
        assert payloads == ["created"]
    finally:
        await assigner.stop()


async def test_new_tasks_behind_full_agents_wake_no_round_until_room_is_freed(
    broker: Broker, listener: Listener
) -> None:
    """A deep backlog behind busy agents: each new task's NOTIFY would run a round that finds
    no agent with room. The assigner lets those wake-ups pass, and still runs at once when room
    appears (a registration, a completion)."""
    await broker.agents.upsert("solo", max_concurrent=1)
    first = await submit(broker)
    assigner = Assigner(broker, listener, tick_interval_ms=SLOW_TICK_MS)
    await assigner.start()
    try:
        await assigner.wait_until(lambda a: a.assigned >= 1, 5)
        rounds = assigner.rounds
        second = await submit(broker)  # a round finds it, and solo full
        await assigner.wait_until(lambda a: a.rounds > rounds, 5)
        # first's own NOTIFY can arrive after the first round began and wake one more round, which
        # may run before second is committed and so find nothing waiting: let the rounds settle.
        rounds = await settled(assigner)
        backlog = [await submit(broker) for _ in range(5)]
        await assigner.wait_until(lambda a: a.passed >= 1, 5)
        await asyncio.sleep(0.3)  # the other notifications arrive meanwhile
        assert assigner.rounds == rounds
        assert assigner.assigned == 1
        assert {(await broker.tasks.get(t)).status for t in backlog} == {TaskStatus.PENDING}
        # Room appears: a new agent, then a completion. Each wakes a round well before the tick.
        await broker.agents.upsert("helper", max_concurrent=1)
        await assigner.wait_until(lambda a: a.assigned >= 2, 5)
        await broker.apply(Complete(task_id=first, actor="solo", result={"done": True}))
        await assigner.wait_until(lambda a: a.assigned >= 3, 5)
        assert (await broker.tasks.get(second)).assigned_agent == "helper"
        assert (await broker.tasks.get(backlog[0])).assigned_agent == "solo"
    finally:
        await assigner.stop()


async def test_scheduled_task_is_assigned_when_it_becomes_available(
    broker: Broker, listener: Listener
) -> None:
    await broker.agents.upsert("idle")
    assigner = Assigner(broker, listener, tick_interval_ms=SLOW_TICK_MS)
    await assigner.start()
    try:
        await assigner.wait_until(lambda a: a.rounds >= 1, 5)
        soon = datetime.now(UTC) + timedelta(milliseconds=400)
        task_id = await submit(broker, available_at=soon)
        await assigner.wait_until(lambda a: a.assigned >= 1, 5)
        task = await broker.tasks.get(task_id)
        assert task.assigned_agent == "idle"
        assert task.available_at <= task.deadline_at - timedelta(seconds=task.timeout_seconds)
    finally:
        await assigner.stop()


async def test_batches_assign_everything_and_are_measured(
    broker: Broker, listener: Listener
) -> None:
    for i in range(4):
        await broker.agents.upsert(f"agent-{i}", max_concurrent=50)
    metrics = Metrics()
    async with broker.tasks.pool.connection() as conn:
        await conn.execute(
            "INSERT INTO dispatch.tasks (title, requester) SELECT 'bulk ' || g, 'req'"
            " FROM generate_series(1, 250) g"
        )
    assigner = Assigner(broker, listener, metrics=metrics, tick_interval_ms=SLOW_TICK_MS)
    await assigner.start()
    try:
        await assigner.wait_until(lambda a: a.assigned >= 200, 10)
    finally:
        await assigner.stop()
    agents = await broker.agents.all()
    assert [a.active_tasks for a in agents] == [50, 50, 50, 50]
    r = metrics.registry
    assert r.get_sample_value("dispatch_assign_batch_size_sum") == 200
    # The bulk tasks require no capability: their waits are under (any).
    assert r.get_sample_value(
        "dispatch_assignment_wait_seconds_count", {"capability": "(any)"}
    ) == 200


async def test_sleeping_winner_is_woken_and_reassigned_after_the_wake_timeout(
    pool: AsyncConnectionPool[Any], listener: Listener, warren: FakeWarren
) -> None:
    broker = Broker(
        Store(pool), assignment=AssignmentSettings(wake_timeout_ms=300)
    )
    await broker.apply_config()
    await broker.agents.upsert("sleepy", status=AgentStatus.SLEEPING)
    await broker.agents.upsert("busy", status=AgentStatus.BUSY)
    warren.set("sleepy", "sleeping")
    warren.wake_fails = 2  # Warren hiccups: the wake is retried
    client = WarrenClient(warren.url, "warren-token")
    waker = Waker(client.wake, first_delay=0.05)
    assigner = Assigner(broker, listener, waker=waker, tick_interval_ms=SLOW_TICK_MS)
    reaper = Reaper(broker, tick_interval_ms=SLOW_TICK_MS)
    await assigner.start()
    try:
        task_id = await submit(broker, timeout_seconds=600)
        await assigner.wait_until(lambda a: a.assigned >= 1, 5)
        assert (await broker.tasks.get(task_id)).assigned_agent == "sleepy"
        assert await asyncio.to_thread(warren.wake_event.wait, 5)
        assert warren.wakes == ["sleepy"]
        wake_calls = [r for r in warren.requests if r[0] == "POST"]
        assert len(wake_calls) == 3
        assert all(r[2].get("Authorization") == "Bearer warren-token" for r in wake_calls)

        # The agent never starts: the reaper (sleeping until the wake deadline, not the 60 s tick)
        # takes the task back and the assigner gives it to the other agent.
        await reaper.start()
        await assigner.wait_until(lambda a: a.assigned >= 2, 5)
        task = await broker.tasks.get(task_id)
        assert (task.assigned_agent, task.retry_count, task.previous_agents) == (
            "busy", 1, ["sleepy"],
        )
        events = [e.event for e in await broker.tasks.events(task_id)]
        assert events == ["created", "assigned", "reassigned", "assigned"]
    finally:
        await reaper.stop()
        await assigner.stop()
        await client.close()


async def test_health_recovers_with_the_first_batch_of_a_long_round(broker: Broker) -> None:
    """After a failed round, a round working through a backlog reports ok as soon as a batch
    works, not only when the whole backlog is assigned (which can take many seconds)."""
    await broker.agents.upsert("big", max_concurrent=1000)
    for i in range(300):
        await submit(broker, priority=i % 3)
    assigner = Assigner(broker, None, tick_interval_ms=SLOW_TICK_MS)
    assigner.batch = 10
    assigner.last_error = "database unavailable"  # what a failed round leaves behind
    assert assigner.health() == {"assigner": "error"}
    round_ = asyncio.create_task(assigner.run_once())
    while assigner.health() != {"assigner": "ok"}:
        assert not round_.done(), "health stayed 'error' for the whole round"
        await asyncio.sleep(0)
    assert not round_.done()
    assert len(await round_) == 300


async def test_the_reapers_sweep_parks_what_no_agent_can_take_and_a_registration_brings_it_back(
    broker: Broker, listener: Listener, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    """The reaper's tick parks a task that no agent in the directory could take; an agent that
    can take it registers, and the assigner gives it the task at once, not at a tick."""
    await broker.agents.upsert("writer", capabilities=["prose"])
    task_id = await submit(broker, required_capabilities=["gpu"])
    reaper = Reaper(broker, tick_interval_ms=SLOW_TICK_MS)
    await reaper.start()
    try:
        await reaper.wait_until(lambda r: r.unmatched >= 1, 5)
    finally:
        await reaper.stop()
    row = sql.execute("SELECT parked, unmatched_at IS NOT NULL AS unmatched FROM dispatch.tasks"
                      " WHERE task_id = %s", (task_id,)).fetchone()
    assert row == {"parked": True, "unmatched": True}
    assigner = Assigner(broker, listener, tick_interval_ms=SLOW_TICK_MS)
    await assigner.start()
    try:
        await assigner.wait_until(lambda a: a.rounds >= 1, 5)
        assert assigner.assigned == 0
        await broker.agents.upsert("gpu-box", capabilities=["gpu"])
        await assigner.wait_until(lambda a: a.assigned >= 1, 5)
        assert (await broker.tasks.get(task_id)).assigned_agent == "gpu-box"
    finally:
        await assigner.stop()


async def test_a_task_a_round_lost_to_a_claim_holding_the_slot_is_given_after_it(
    broker: Broker, listener: Listener, db_url: str
) -> None:
    """A round picks the new task for the one agent just as that agent's claim holds its free
    slot (and, finding the task locked by the round, takes nothing): the round gives nothing.
    Once the claim has ended, the assigner looks again: the task does not wait for the tick."""
    await broker.agents.upsert("solo", max_concurrent=1)
    assigner = Assigner(broker, listener, tick_interval_ms=SLOW_TICK_MS)
    await assigner.start()
    claim = await psycopg.AsyncConnection.connect(db_url)
    try:
        await assigner.wait_until(lambda a: a.rounds >= 1, 5)
        # As a claim of solo holds its slot while it walks the queue (dispatch.task_claim).
        await claim.execute("SELECT dispatch.slots_take('solo', 1, 1)")
        lost: list[bool] = []
        assign_round = broker.assign_round

        async def then_the_claim_ends(**kwargs: Any) -> Any:
            answer = await assign_round(**kwargs)
            if not lost:
                lost.append(answer[3])
                await claim.commit()  # it took nothing: the slot is free again
            return answer

        broker.assign_round = then_the_claim_ends  # type: ignore[method-assign]
        task_id = await submit(broker)
        await assigner.wait_until(lambda a: a.assigned >= 1, 5)
        assert lost == [True]
        task = await broker.tasks.get(task_id)
        assert (task.status, task.assigned_agent) == (TaskStatus.ASSIGNED, "solo")
    finally:
        await claim.close()
        await assigner.stop()
