"""The outbox relay against a real nats-server: what a consumer of DISPATCH_EVENTS sees."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from nats.aio.client import Client
from psycopg_pool import AsyncConnectionPool

from dispatch.broker import Broker
from dispatch.events.connection import NatsConnection
from dispatch.events.relay import Outgoing, Relay
from dispatch.metrics import Metrics
from dispatch.models import Cancel, Complete, Fail, NewTask, Progress, Requeue, Start, Task, Update
from dispatch.notify import Listener
from dispatch.store import Store
from tests.events.conftest import eventually, unpublished
from tests.events.streamread import Stored, read_stream, stream_count
from tests.natsfix import NatsServer

Sql = psycopg.Connection[dict[str, Any]]


def event_log(sql: Sql) -> list[dict[str, Any]]:
    return sql.execute(
        "SELECT id, task_id, event, actor, payload, created_at FROM dispatch.task_events"
        " ORDER BY id"
    ).fetchall()


def msg_id_of(e: dict[str, Any]) -> str:
    """The Nats-Msg-Id of an event row: its id and created_at in microseconds since the epoch."""
    micros = (e["created_at"] - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    return f"{e['id']}.{micros}"


def expected_messages(log: list[dict[str, Any]]) -> int:
    return len(log) + sum(1 for e in log if e["event"] == "assigned")


def assert_stream_matches_log(stored: list[Stored], log: list[dict[str, Any]]) -> None:
    """Every event exactly once on its subject, with its payload, in per-task order."""
    by_msg_id = {}
    for m in stored:
        assert m.headers["Nats-Msg-Id"] not in by_msg_id, f"duplicate {m.headers['Nats-Msg-Id']}"
        by_msg_id[m.headers["Nats-Msg-Id"]] = m
    assert len(stored) == expected_messages(log)
    for e in log:
        m = by_msg_id[msg_id_of(e)]
        assert m.subject == f"swarm.task.{e['task_id']}.{e['event']}"
        body = m.body
        assert body["event"] == e["event"]
        assert body["task_id"] == str(e["task_id"])
        assert body["event_id"] == e["id"]
        assert body["actor"] == e["actor"]
        assert datetime.fromisoformat(body["at"]) == e["created_at"]
        assert body["task"]["task_id"] == str(e["task_id"])
        for key, value in e["payload"].items():
            assert body[key] == value, (e["event"], key)
        if e["event"] == "assigned":
            agent = by_msg_id[f"{msg_id_of(e)}:agent"]
            agent_id = e["payload"]["assigned_agent"]
            assert agent.subject == f"swarm.dispatch.agent.{agent_id}.assigned"
            assert agent.body == body
    seen: dict[str, list[int]] = defaultdict(list)
    for m in stored:
        if m.subject.startswith("swarm.task."):
            seen[m.body["task_id"]].append(m.body["event_id"])
    for task_id, ids in seen.items():
        assert ids == sorted(ids), f"task {task_id} out of order: {ids}"


async def lifecycle(broker: Broker, agent: str, title: str) -> Task:
    """created, assigned, started, completed; the agent only claims work of its own lane."""
    await broker.agents.upsert(agent, capabilities=[agent])
    await broker.submit(NewTask(title=title, required_capabilities=[agent]), requester="req")
    claimed = await broker.claim(agent, [agent])
    assert claimed is not None
    await broker.apply(Start(task_id=claimed.task_id, agent_id=agent))
    return await broker.apply(Complete(task_id=claimed.task_id, actor=agent, result={"ok": True}))


async def test_every_event_type_arrives_once_with_its_payload_in_task_order(
    broker: Broker, relay: Relay, client: Client, sql: Sql
) -> None:
    await broker.agents.upsert("agent-a")
    await broker.agents.upsert("agent-b")
    later = datetime.now(UTC) + timedelta(hours=1)
    # created, assigned, started, progress, completed
    t1, _ = await broker.submit(NewTask(title="one", metadata={"k": 1}), requester="req")
    assert (await broker.claim("agent-a")) is not None
    await broker.apply(Start(task_id=t1.task_id, agent_id="agent-a"))
    await broker.apply(
        Progress(task_id=t1.task_id, agent_id="agent-a", percent=50, message="half", data={"n": 1})
    )
    await broker.apply(Complete(task_id=t1.task_id, actor="agent-a", result={"answer": 42}))
    # failed + retry, failed + dlq, requeued, cancelled
    t2, _ = await broker.submit(NewTask(title="two", max_retries=1), requester="req")
    assert (await broker.claim("agent-a")) is not None
    await broker.apply(Fail(task_id=t2.task_id, agent_id="agent-a", error="boom"))
    assert (await broker.claim("agent-b", now=later)) is not None
    await broker.apply(Fail(task_id=t2.task_id, agent_id="agent-b", error="boom again"))
    await broker.apply(Requeue(task_id=t2.task_id, actor="admin"))
    await broker.apply(Cancel(task_id=t2.task_id, actor="req", reason="not needed"))
    # timeout (+ retry)
    t3, _ = await broker.submit(NewTask(title="three"), requester="req")
    assert (await broker.claim("agent-a")) is not None
    assert [x.event for x in await broker.expire(now=later + timedelta(days=1))] == ["timeout"]
    # released (agent stopped)
    await broker.apply(Cancel(task_id=t3.task_id, actor="req"))
    t4, _ = await broker.submit(NewTask(title="four"), requester="req")
    assert (await broker.claim("agent-b")) is not None
    assert await broker.agents.stop("agent-b") == 1
    await broker.apply(Cancel(task_id=t4.task_id, actor="req"))
    # unmatched, updated
    t5, _ = await broker.submit(
        NewTask(title="five", required_capabilities=["nobody-has-this"]), requester="req"
    )
    assert await broker.tasks.report_unmatched() == 1
    await broker.apply(Update(task_id=t5.task_id, actor="req", metadata_patch={"x": "y"}))

    log = event_log(sql)
    kinds = {e["event"] for e in log}
    assert kinds >= {
        "created", "assigned", "started", "progress", "completed", "failed", "retry", "dlq",
        "requeued", "cancelled", "timeout", "released", "unmatched", "updated",
    }
    # The relay's poll interval is 600 s: only NOTIFY wakes it in time.
    await eventually(lambda: _async(unpublished(sql) == 0), what="relay to publish everything")
    assert_stream_matches_log(await read_stream(client), log)


async def _async(value: bool) -> bool:
    return value


async def test_events_wait_in_the_log_while_nats_is_down_and_go_out_once_in_order(
    broker: Broker, relay: Relay, nats_conn: NatsConnection, nats_server: NatsServer,
    metrics: Metrics, client: Client, sql: Sql,
) -> None:
    await lifecycle(broker, "agent-a", "before the outage")
    await eventually(lambda: _async(unpublished(sql) == 0), what="first task published")

    nats_server.stop()
    await eventually(lambda: _async(nats_conn.health() == {"nats": "down"}), what="nats down")
    for i in range(200):
        await lifecycle(broker, "agent-a", f"during the outage {i}")
    backlog = unpublished(sql)
    assert backlog == 200 * 4
    failures = metrics.registry.get_sample_value("dispatch_nats_publish_failures_total")
    assert failures is not None and failures > 0

    nats_server.start()
    await eventually(lambda: _async(nats_conn.health() == {"nats": "ok"}), what="nats back")
    await eventually(lambda: _async(unpublished(sql) == 0), 60, what="backlog published")
    await eventually(lambda: _async(client.is_connected), what="client reconnected")
    log = event_log(sql)
    assert await stream_count(client) == expected_messages(log)
    assert_stream_matches_log(await read_stream(client), log)


class KilledBeforeMark(Relay):
    """A relay that dies after JetStream acked its batch and before it could mark it."""

    async def publish(
        self, events: Any, tasks: dict[uuid.UUID, Task]
    ) -> tuple[list[int], Any]:
        await super().publish(events, tasks)
        raise KeyboardInterrupt("killed between publish and mark")


async def test_relay_killed_between_publish_and_mark_leaves_no_duplicate(
    broker: Broker, pool: AsyncConnectionPool[Any], listener: Listener,
    nats_conn: NatsConnection, client: Client, sql: Sql,
) -> None:
    for i in range(20):
        await lifecycle(broker, "agent-a", f"task {i}")
    log = event_log(sql)
    doomed = KilledBeforeMark(Broker(Store(pool)), listener, nats_conn)
    await doomed.ensure_stream()
    try:
        await doomed.relay_once()
        raise AssertionError("the relay should have died")
    except KeyboardInterrupt:
        pass
    # Everything reached the stream, nothing was marked.
    assert await stream_count(client) == expected_messages(log)
    assert unpublished(sql) == len(log)

    successor = Relay(Broker(Store(pool)), listener, nats_conn, poll_interval=600)
    await successor.start()
    try:
        # Its count, not only the rows: it counts once its transaction has committed and its
        # connection is back in the pool, and a stop in between would cut the count short.
        await eventually(
            lambda: _async(unpublished(sql) == 0 and successor.published == len(log)),
            what="successor marks and counts all",
        )
    finally:
        await successor.stop()
    assert successor.published == len(log)
    assert_stream_matches_log(await read_stream(client), log)


async def test_two_relay_replicas_publish_each_event_once_in_task_order(
    broker: Broker, pool: AsyncConnectionPool[Any], listener: Listener,
    nats_server: NatsServer, client: Client, sql: Sql,
) -> None:
    conns = [NatsConnection(nats_server.url) for _ in range(2)]
    relays = [
        Relay(Broker(Store(pool)), listener, c, poll_interval=600, batch_size=20) for c in conns
    ]
    for c in conns:
        await c.start()
        assert await c.wait_connected(10)
    for r in relays:
        await r.start()
    try:
        async def lane(agent: str) -> None:
            for i in range(30):
                await lifecycle(broker, agent, f"{agent} task {i}")

        await asyncio.gather(*(lane(f"agent-{n}") for n in range(4)))
        await eventually(lambda: _async(unpublished(sql) == 0), 60, what="all published")
        log = event_log(sql)
        # A relay counts a batch once its transaction has committed, a moment after the rows
        # show it: stopping it in between would lose that count, not the events.
        await eventually(lambda: _async(sum(r.published for r in relays) == len(log)), 10,
                         what="every batch counted")
    finally:
        for r in relays:
            await r.stop()
        for c in conns:
            await c.stop()
    assert sum(r.published for r in relays) == len(log)
    assert_stream_matches_log(await read_stream(client), log)


def test_a_second_replica_stands_by_while_one_relays(db_url: str, sql: Sql) -> None:
    """The relay's advisory lock: while one transaction relays, another gets no lock and no rows,
    and once the first commits without marking, the same rows are there for the next one."""
    sql.execute("INSERT INTO dispatch.tasks (title) VALUES ('from psql')")
    with psycopg.connect(db_url) as a, psycopg.connect(db_url) as b:
        assert a.execute("SELECT dispatch.event_relay_lock()").fetchone() == (True,)
        rows_a = a.execute("SELECT id FROM dispatch.event_relay_batch(10)").fetchall()
        assert len(rows_a) == 1
        assert b.execute("SELECT dispatch.event_relay_lock()").fetchone() == (False,)
        # Even past the advisory lock, SKIP LOCKED would not hand b the rows a is publishing.
        assert b.execute("SELECT id FROM dispatch.event_relay_batch(10)").fetchall() == []
        b.rollback()
        a.rollback()  # a died before marking
        assert b.execute("SELECT dispatch.event_relay_lock()").fetchone() == (True,)
        assert b.execute("SELECT id FROM dispatch.event_relay_batch(10)").fetchall() == rows_a
        b.execute("SELECT dispatch.event_mark_published(%s)", ([r[0] for r in rows_a],))
        b.commit()
    assert unpublished(sql) == 0


async def test_start_up_brings_an_existing_stream_into_line_and_keeps_its_limits(
    pool: AsyncConnectionPool[Any], listener: Listener, nats_conn: NatsConnection, client: Client
) -> None:
    js = client.jetstream()
    await js.add_stream(
        name="DISPATCH_EVENTS", subjects=["swarm.task.>"], max_age=3600, duplicate_window=10
    )
    relay = Relay(Broker(Store(pool)), listener, nats_conn)
    await relay.ensure_stream()
    config = (await js.stream_info("DISPATCH_EVENTS")).config
    assert sorted(config.subjects or []) == ["swarm.dispatch.>", "swarm.task.*.*"]
    assert config.duplicate_window == 120
    assert config.max_age == 3600
    # The request subject is no longer the stream's: a request gets no JetStream ack.
    sub = await client.subscribe("swarm.task.request")
    await client.publish("swarm.task.request", b"{}")
    await sub.next_msg(timeout=5)
    # The stream takes messages in order: once this one is acked, the request would be stored.
    await js.publish(f"swarm.task.{uuid.uuid4()}.marker", b"{}")
    assert (await js.stream_info("DISPATCH_EVENTS")).state.messages == 1


class RefusedOnce(Relay):
    """JetStream refuses the first publish of one event (a wrong expected stream), as if that one
    message had been lost; everything else goes through."""

    def __init__(self, *args: Any, refuse: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refuse: int | None = refuse

    def headers(self, message: Outgoing) -> dict[str, str]:
        headers = super().headers(message)
        if message.event_id == self.refuse:
            self.refuse = None
            headers["Nats-Expected-Stream"] = "NOT_THIS_ONE"
        return headers


async def test_a_failed_publish_never_lets_a_later_event_of_its_task_overtake_it(
    broker: Broker, pool: AsyncConnectionPool[Any], listener: Listener,
    nats_conn: NatsConnection, metrics: Metrics, client: Client, sql: Sql,
) -> None:
    for i in range(5):
        await lifecycle(broker, "agent-a", f"task {i}")
    log = event_log(sql)
    first_of_third_task = log[8]["id"]  # the third task's `created`; its 3 later events follow
    assert log[8]["event"] == "created"
    relay = RefusedOnce(
        Broker(Store(pool)), listener, nats_conn, metrics=metrics, publish_timeout=1,
        refuse=first_of_third_task,
    )
    await relay.start()
    try:
        await eventually(lambda: _async(unpublished(sql) == 0), what="all published in the end")
    finally:
        await relay.stop()
    assert relay.refuse is None
    assert metrics.registry.get_sample_value("dispatch_nats_publish_failures_total") == 1
    assert_stream_matches_log(await read_stream(client), log)


async def test_an_event_jetstream_refuses_for_good_is_set_aside_and_the_rest_flow(
    broker: Broker, relay: Relay, client: Client, sql: Sql, metrics: Metrics
) -> None:
    """An operator allowed one message per subject, refusing new ones; one task is cancelled a
    second time (after a requeue), so its second `cancelled` is refused. It is retried, then set
    aside (marked with the reason, counted, shown by health) while every other event goes out."""
    import dataclasses

    from nats.js.api import DiscardPolicy

    await eventually(lambda: _stream_exists(client), 10, "the stream")
    js = client.jetstream()
    info = await js.stream_info("DISPATCH_EVENTS")
    await js.update_stream(dataclasses.replace(
        info.config, max_msgs_per_subject=1, discard=DiscardPolicy.NEW,
        discard_new_per_subject=True,
    ))
    relay.publish_timeout = 1.0  # the refused message gets no ack: it times out
    small, _ = await broker.submit(NewTask(title="small"), requester="req")
    twice, _ = await broker.submit(NewTask(title="twice"), requester="req")
    await broker.apply(Cancel(task_id=twice.task_id, actor="req"))
    await broker.apply(Requeue(task_id=twice.task_id, actor="admin"))
    await broker.apply(Cancel(task_id=twice.task_id, actor="req"))
    after, _ = await broker.submit(NewTask(title="after"), requester="req")

    async def settled() -> bool:
        return unpublished(sql) == 0

    await eventually(settled, 30, "every event published or set aside")
    aside = sql.execute(
        "SELECT task_id, event, relay_error FROM dispatch.task_events"
        " WHERE relay_error IS NOT NULL"
    ).fetchall()
    assert [(r["task_id"], r["event"]) for r in aside] == [(twice.task_id, "cancelled")]
    assert "refused by JetStream 3 times" in aside[0]["relay_error"]
    # The relay counts it once its transaction has committed, a moment after the rows show it.
    await eventually(lambda: _async(relay.health().get("events_set_aside") == 1), 10,
                     "health counting the event set aside")
    assert metrics.events_set_aside._value.get() == 1
    # What comes after flows: a new task's events go out at once.
    later, _ = await broker.submit(NewTask(title="later"), requester="req")
    await eventually(settled, 30, "the later task published")
    subjects = {m.subject for m in await read_stream(client)}
    for task in (small, after, later):
        assert f"swarm.task.{task.task_id}.created" in subjects
    assert f"swarm.task.{twice.task_id}.requeued" in subjects
    assert relay.health()["event_relay"] == "ok"


async def test_an_event_larger_than_the_streams_limit_goes_out_without_its_task(
    broker: Broker, relay: Relay, client: Client, sql: Sql
) -> None:
    """An operator capped the stream's message size after the relay started; one task is larger.
    JetStream refuses its first message (no ack); the relay reads the limit again and sends the
    event without the task snapshot, marked truncated. Nothing is set aside."""
    import dataclasses

    await eventually(lambda: _stream_exists(client), 10, "the stream")
    js = client.jetstream()
    info = await js.stream_info("DISPATCH_EVENTS")
    await js.update_stream(dataclasses.replace(info.config, max_msg_size=4096))
    relay.publish_timeout = 1.0  # JetStream does not ack an oversized message: it times out
    big, _ = await broker.submit(NewTask(title="big", metadata={"blob": "x" * 20_000}),
                                 requester="req")
    small, _ = await broker.submit(NewTask(title="small"), requester="req")

    async def settled() -> bool:
        return unpublished(sql) == 0

    await eventually(settled, 30, "every event published")
    stored = {m.subject: m for m in await read_stream(client)}
    sent = stored[f"swarm.task.{big.task_id}.created"].body
    assert sent["truncated"] is True and sent["task"] is None
    assert sent["task_id"] == str(big.task_id) and sent["event"] == "created"
    assert stored[f"swarm.task.{small.task_id}.created"].body["task"]["title"] == "small"
    assert sql.execute(
        "SELECT count(*) AS n FROM dispatch.task_events WHERE relay_error IS NOT NULL"
    ).fetchone()["n"] == 0
    assert "events_set_aside" not in relay.health()


async def _stream_exists(client: Client) -> bool:
    try:
        await client.jetstream().stream_info("DISPATCH_EVENTS")
    except Exception:
        return False
    return True


async def test_a_task_row_with_an_unreadable_time_does_not_stall_the_relay(
    broker: Broker, relay: Relay, client: Client, sql: Sql
) -> None:
    """A row holding a time Python cannot read (written around the range check: here a DBA
    dropped it) is relayed like any other, with the time read as the latest one."""
    task, _ = await broker.submit(NewTask(title="odd"), requester="req")
    # Off the event loop: the relay's batch holds its transaction across the publish, so DDL
    # run on the loop's own thread would wait for a batch that cannot finish.
    await asyncio.to_thread(
        sql.execute, "ALTER TABLE dispatch.tasks DROP CONSTRAINT tasks_times_range"
    )
    await asyncio.to_thread(
        sql.execute,
        "UPDATE dispatch.tasks SET started_at = 'infinity' WHERE task_id = %s",
        (task.task_id,),
    )
    await broker.apply(Cancel(task_id=task.task_id, actor="req", reason="odd"))
    after, _ = await broker.submit(NewTask(title="after"), requester="req")

    async def settled() -> bool:
        return unpublished(sql) == 0

    await eventually(settled, 30, "every event published")
    stored = {m.subject: m for m in await read_stream(client)}
    cancelled = stored[f"swarm.task.{task.task_id}.cancelled"]
    assert cancelled.body["task"]["started_at"].startswith("9999-12-31")
    assert f"swarm.task.{after.task_id}.created" in stored
    assert relay.health()["event_relay"] == "ok"
