"""Retention: terminal tasks older than retention.hours go; the history is partitioned by time and
goes by whole partitions, created ahead of the clock."""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from dispatch.broker import Broker
from dispatch.engine.pruner import PRUNE_LOCK_KEY, Pruner
from dispatch.models import Cancel, Complete, Start, TaskStatus
from tests.factories import T0, at, make_task

HOUR = 3600.0


async def test_pruner_deletes_old_terminal_tasks_only(
    broker: Broker, sql: psycopg.Connection[Any]
) -> None:
    await broker.agents.upsert("a", max_concurrent=10)
    old_done = await make_task(broker, title="old and done")
    old_running = await make_task(broker, title="old and still running", timeout_seconds=10**6)
    await broker.assign(now=at(0))
    await broker.apply(
        Complete(task_id=old_done.task_id, actor="a", result={"ok": True}), now=at(1)
    )
    await broker.apply(Start(task_id=old_running.task_id, agent_id="a"), now=at(1))
    recent = await make_task(broker, title="recently cancelled")
    await broker.apply(
        Cancel(task_id=recent.task_id, actor="req", reason="no longer needed"), now=at(47 * HOUR)
    )
    pending = await make_task(broker, title="old but pending", required_capabilities=["nobody"])

    pruner = Pruner(broker, retention_hours=24)
    assert await pruner.run_once(now=at(48 * HOUR)) == 1
    left = {r["title"] for r in sql.execute("SELECT title FROM dispatch.tasks").fetchall()}
    assert left == {"old and still running", "recently cancelled", "old but pending"}
    # Its history of the test's clock went with its partition (its `created` event, written at
    # the real clock, is in the real clock's slot).
    gone = sql.execute(
        "SELECT count(*) AS n FROM dispatch.task_events WHERE task_id = %s AND event <> 'created'",
        (old_done.task_id,),
    ).fetchone()
    assert gone == {"n": 0}
    assert (await broker.tasks.get(pending.task_id)).status is TaskStatus.PENDING


async def test_one_replica_prunes_at_a_time(
    broker: Broker, sql: psycopg.Connection[Any]
) -> None:
    await broker.agents.upsert("a")
    task = await make_task(broker)
    await broker.assign(now=at(0))
    await broker.apply(Complete(task_id=task.task_id, actor="a", result={}), now=at(1))
    pruner = Pruner(broker, retention_hours=1)
    sql.execute("SELECT pg_advisory_lock(%s)", (PRUNE_LOCK_KEY,))
    assert await pruner.run_once(now=at(2 * HOUR)) is None
    sql.execute("SELECT pg_advisory_unlock(%s)", (PRUNE_LOCK_KEY,))
    assert await pruner.run_once(now=at(2 * HOUR)) == 1


def partitions(sql: psycopg.Connection[Any]) -> list[tuple[Any, Any]]:
    rows = sql.execute(
        "SELECT from_at, to_at FROM dispatch.history_partitions WHERE from_at IS NOT NULL"
    ).fetchall()
    return [(r["from_at"], r["to_at"]) for r in rows]


def placed(sql: psycopg.Connection[Any], task_id: Any) -> list[str]:
    rows = sql.execute(
        "SELECT tableoid::regclass::text AS part FROM dispatch.task_events WHERE task_id = %s"
        " ORDER BY id",
        (task_id,),
    ).fetchall()
    return [r["part"] for r in rows]


async def test_history_partitions_are_created_ahead_and_dropped_whole(
    broker: Broker, sql: psycopg.Connection[Any]
) -> None:
    pruner = Pruner(broker, retention_hours=24)  # 6-hour partitions
    assert pruner.width == timedelta(hours=6)
    await pruner.run_once(now=at(0))
    made = partitions(sql)
    assert made[0] == (T0, T0 + timedelta(hours=6))
    assert made[-1][1] >= T0 + 3 * timedelta(hours=6)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(made))  # no gaps

    # The lifecycle writes into them, never into the default partition.
    await broker.agents.upsert("a")
    task = await make_task(broker, title="early")
    await broker.assign(now=at(60))
    await broker.apply(Complete(task_id=task.task_id, actor="a", result={}), now=at(120))
    later = await make_task(broker, title="later")
    await broker.apply(Cancel(task_id=later.task_id, actor="req", reason="x"), now=at(7 * HOUR))
    assert placed(sql, task.task_id)[1:] == ["dispatch.task_events_p20300101_120000"] * 2
    assert placed(sql, later.task_id)[1:] == ["dispatch.task_events_p20300101_180000"]

    # A day after the first partition ended, it goes whole: the events of `early` with it, the
    # task itself by its own retention (it finished more than 24 hours before). (The `created`
    # events are written at the real clock, years before T0, in a slot with no partition: they
    # wait in the default partition while that slot is the clock's own.)
    assert await pruner.run_once(now=at(30 * HOUR + 60)) == 1
    assert placed(sql, task.task_id) == ["dispatch.task_events_default"]
    assert sql.execute(
        "SELECT to_regclass('dispatch.task_events_p20300101_120000') AS t"
    ).fetchone() == {"t": None}
    assert placed(sql, later.task_id) == [
        "dispatch.task_events_default", "dispatch.task_events_p20300101_180000"
    ]
    assert pruner.partitions_dropped == 1
    assert partitions(sql)[0][0] == T0 + timedelta(hours=6)
    assert pruner.health()["history"] == "ok"


async def test_an_event_outside_every_partition_is_kept_and_then_placed(
    broker: Broker, sql: psycopg.Connection[Any]
) -> None:
    pruner = Pruner(broker, retention_hours=1)  # 15-minute partitions
    await pruner.run_once(now=at(0))
    # Ten years later than any partition: the transition still commits, into the default one.
    far = at(10 * 365 * 24 * HOUR)
    task = await make_task(broker)
    await broker.apply(Cancel(task_id=task.task_id, actor="req", reason="x"), now=far)
    assert placed(sql, task.task_id)[-1] == "dispatch.task_events_default"
    # The next round moves it into a partition of its own slot, and leaves the default empty.
    await pruner.run_once(now=at(60))
    cancelled = sql.execute(
        "SELECT tableoid::regclass::text AS part, created_at FROM dispatch.task_events"
        " WHERE task_id = %s AND event = 'cancelled'",
        (task.task_id,),
    ).fetchone()
    assert cancelled is not None and cancelled["created_at"] == far
    slot = far.replace(minute=far.minute - far.minute % 15, second=0, microsecond=0)
    assert cancelled["part"] == f"dispatch.task_events_p{slot:%Y%m%d_%H%M%S}"
    assert sql.execute(
        "SELECT count(*) AS n FROM dispatch.task_events_default WHERE event <> 'created'"
    ).fetchone() == {"n": 0}


def test_the_clocks_own_slot_is_not_attached_while_events_arrive_in_the_default_partition(
    sql: psycopg.Connection[Any],
) -> None:
    """Attaching a partition for rows being written into the default partition would fail those
    writes (their partition check): the slot of the clock waits, the next ones are created."""
    prepare = "SELECT dispatch.history_prepare(now(), now() + interval '30 minutes', '15 minutes')"
    sql.execute("INSERT INTO dispatch.task_events (task_id, event, actor) VALUES"
                " (gen_random_uuid(), 'created', 'dba')")
    sql.execute(prepare)
    now = sql.execute("SELECT now() AS t").fetchone()
    assert now is not None
    assert all(from_at > now["t"] for from_at, _ in partitions(sql))
    assert len(partitions(sql)) >= 1
    sql.execute("INSERT INTO dispatch.task_events (task_id, event, actor) VALUES"
                " (gen_random_uuid(), 'created', 'dba')")
    # With nothing in the default partition, the clock's slot is created too (a new database).
    sql.execute("DELETE FROM dispatch.task_events_default")
    sql.execute(prepare)
    assert any(from_at <= now["t"] < to_at for from_at, to_at in partitions(sql))


async def test_a_drop_that_cannot_have_its_lock_waits_for_the_next_round(
    broker: Broker, sql: psycopg.Connection[Any], db_url: str
) -> None:
    pruner = Pruner(broker, retention_hours=1)
    await pruner.run_once(now=at(0))
    task = await make_task(broker)
    await broker.apply(Cancel(task_id=task.task_id, actor="req", reason="x"), now=at(60))
    # A DBA's open transaction has read the history: the drop must not queue behind it.
    with psycopg.connect(db_url) as reader:
        reader.execute("SELECT count(*) FROM dispatch.task_events")
        assert await pruner.run_once(now=at(2 * HOUR)) == 1
        assert pruner.partitions_dropped == 0
        assert placed(sql, task.task_id)[-1] == "dispatch.task_events_p20300101_120000"
        # Event writes go on meanwhile.
        other = await make_task(broker)
        await broker.apply(Cancel(task_id=other.task_id, actor="req", reason="y"), now=at(2 * HOUR))
    await pruner.run_once(now=at(2 * HOUR))
    assert pruner.partitions_dropped >= 1
    assert placed(sql, task.task_id) in ([], ["dispatch.task_events_default"])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("history_prepare(now(), now() + interval '1 day', interval '10 seconds')",
         "1 minute to 31 days wide"),
        ("history_prepare(now(), now() + interval '10 days', interval '1 minute')",
         "more than 1000 partitions"),
    ],
)
def test_history_functions_refuse_bad_widths(
    sql: psycopg.Connection[Any], call: str, message: str
) -> None:
    with pytest.raises(psycopg.Error, match=message):
        sql.execute(f"SELECT dispatch.{call}")
    assert partitions(sql) == []
