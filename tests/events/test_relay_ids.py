"""Message ids that survive a failover: an event id handed out again gets a new message id, and a
duplicate ack is checked against what the stream holds (tests/chaos/test_failover_async.py runs
the real failover)."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
import pytest
from nats.aio.client import Client
from psycopg_pool import AsyncConnectionPool

from dispatch.broker import Broker
from dispatch.events.connection import NatsConnection
from dispatch.events.relay import MSG_ID_HEADER, STREAM, Relay
from dispatch.events.schemas import ORIGIN_HEADER, ORIGIN_RELAY
from dispatch.metrics import Metrics
from dispatch.models import Cancel, NewTask, Task
from dispatch.notify import Listener
from dispatch.store import Store
from tests.events.conftest import eventually, unpublished
from tests.events.streamread import read_stream
from tests.events.test_relay import (
    assert_stream_matches_log,
    event_log,
    expected_messages,
    lifecycle,
    msg_id_of,
)

Sql = psycopg.Connection[dict[str, Any]]


async def settled(sql: Sql) -> bool:
    return unpublished(sql) == 0


async def one_created(
    broker: Broker, pool: AsyncConnectionPool[Any], listener: Listener,
    nats_conn: NatsConnection, metrics: Metrics, sql: Sql, title: str,
) -> tuple[Relay, Task, dict[str, Any]]:
    """A relay with its stream, and a task just created: the task and its one event row."""
    relay = Relay(Broker(Store(pool)), listener, nats_conn, metrics=metrics)
    await relay.ensure_stream()
    task, _ = await broker.submit(NewTask(title=title), requester="req")
    [created] = event_log(sql)
    return relay, task, created


async def test_an_event_id_issued_again_goes_out_under_a_new_message_id(
    broker: Broker, relay: Relay, client: Client, sql: Sql
) -> None:
    lost = await lifecycle(broker, "agent-a", "written on the lost timeline")
    await eventually(lambda: settled(sql), what="the first task published")
    gone = event_log(sql)
    # What a standby promoted behind its primary looks like: it never got these rows (nor their
    # task), and its sequence hands their ids out again.
    sql.execute("DELETE FROM dispatch.task_events WHERE task_id = %s", (lost.task_id,))
    sql.execute("DELETE FROM dispatch.tasks WHERE task_id = %s", (lost.task_id,))
    sql.execute("SELECT setval(pg_get_serial_sequence('dispatch.task_events', 'id'), %s, false)",
                (gone[0]["id"],))
    await lifecycle(broker, "agent-a", "written after the failover")
    log = event_log(sql)
    assert [e["id"] for e in log] == [e["id"] for e in gone]  # the same ids, other events
    await eventually(lambda: settled(sql), what="the second task published")
    stored = await read_stream(client)
    assert len(stored) == expected_messages(gone) + expected_messages(log)
    assert_stream_matches_log([m for m in stored if m.body["task_id"] != str(lost.task_id)], log)
    assert relay.conflicts == 0 and relay.health()["event_relay"] == "ok"


async def test_a_foreign_message_under_an_events_id_does_not_swallow_the_event(
    broker: Broker, pool: AsyncConnectionPool[Any], listener: Listener,
    nats_conn: NatsConnection, metrics: Metrics, client: Client, sql: Sql,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Something else was stored under the message id the event gets (another timeline's event
    written in the same microsecond, a stray publisher): JetStream answers duplicate; the relay
    reads the stored message, sees another event, logs it and publishes the event again under a
    new id. A plain re-publish of an event (the same event, a newer task snapshot) is only
    counted."""
    relay, task, created = await one_created(
        broker, pool, listener, nats_conn, metrics, sql, "squatted")
    taken = msg_id_of(created)
    js = client.jetstream()
    squatter = await js.publish(
        f"swarm.task.{task.task_id}.created", b'{"event": "created", "from": "elsewhere"}',
        headers={MSG_ID_HEADER: taken},
    )
    assert not squatter.duplicate

    with caplog.at_level(logging.ERROR, logger="dispatch.events.relay"):
        assert await relay.relay_once() is False
    assert unpublished(sql) == 0
    stored = await read_stream(client)
    assert [m.headers[MSG_ID_HEADER] for m in stored] == [taken, f"{taken}+1"]
    ours = stored[1]
    assert ours.headers[ORIGIN_HEADER] == ORIGIN_RELAY
    assert (ours.body["event_id"], ours.body["event"]) == (created["id"], "created")
    assert any(f"event {created['id']} " in r.getMessage() for r in caplog.records)
    assert relay.conflicts == 1 and relay.health()["event_id_conflicts"] == 1
    conflicts = ("dispatch_event_duplicates_total", {"verdict": "conflict"})
    assert metrics.registry.get_sample_value(*conflicts) == 1

    # The same event once more (as after a relay killed before it marked), its task changed
    # since: dropped by JetStream, counted as a re-publish, nothing new in the stream.
    other, _ = await broker.submit(NewTask(title="sent twice"), requester="req")
    assert await relay.relay_once() is False
    await broker.apply(Cancel(task_id=other.task_id, actor="req"))
    sql.execute("UPDATE dispatch.task_events SET published_at = NULL WHERE task_id = %s"
                " AND event = 'created'", (other.task_id,))
    before = len(await read_stream(client))
    assert await relay.relay_once() is False
    assert unpublished(sql) == 0
    after = await read_stream(client)
    assert len(after) == before + 1  # the cancel, not the created again
    assert relay.republished == 1 and relay.conflicts == 1
    assert metrics.registry.get_sample_value(
        "dispatch_event_duplicates_total", {"verdict": "same"}) == 1
    assert (await js.stream_info(STREAM)).state.messages == len(after)


async def test_a_taken_fallback_id_is_checked_too_and_a_retry_adds_nothing(
    broker: Broker, pool: AsyncConnectionPool[Any], listener: Listener,
    nats_conn: NatsConnection, metrics: Metrics, client: Client, sql: Sql,
) -> None:
    """The event's id and its first fallback are both taken: it lands under the second. Sent again
    (a relay killed before it marked), it follows the same ids and finds itself there: nothing new
    in the stream."""
    relay, task, created = await one_created(
        broker, pool, listener, nats_conn, metrics, sql, "squatted twice")
    taken = msg_id_of(created)
    js = client.jetstream()
    for squatted in (taken, f"{taken}+1"):
        await js.publish(f"swarm.task.{task.task_id}.created", b"{}",
                         headers={MSG_ID_HEADER: squatted})
    assert await relay.relay_once() is False
    stored = await read_stream(client)
    assert [m.headers[MSG_ID_HEADER] for m in stored] == [taken, f"{taken}+1", f"{taken}+2"]
    assert stored[2].body["event_id"] == created["id"]

    sql.execute("UPDATE dispatch.task_events SET published_at = NULL")
    assert await relay.relay_once() is False
    assert unpublished(sql) == 0
    assert len(await read_stream(client)) == 3
    # Counted by the first look at each publish: the event's own id was taken both times.
    assert (relay.conflicts, relay.republished) == (2, 0)
