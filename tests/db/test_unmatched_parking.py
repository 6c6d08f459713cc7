"""Parking what no agent can take: the reaper's sweep takes a backlog that no agent of the
directory could take out of the walk, and a directory change brings it back in its place."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import psycopg

from dispatch.broker import Broker
from dispatch.db import CONNECT_KWARGS
from dispatch.models import AgentStatus, NewTask, Task, TaskStatus
from tests.factories import at, make_task

_STRANDED = """
INSERT INTO dispatch.tasks (title, requester, required_capabilities, concurrency_key)
SELECT 'stranded ' || g, 'req', '{gpu}', %(key)s FROM generate_series(1, %(n)s) g
RETURNING task_id
"""


async def submit(broker: Broker, title: str = "a task", **fields: Any) -> Task:
    """A task available now (the walk of these tests is the one at now())."""
    task, _ = await broker.submit(NewTask(title=title, **fields), requester="req")
    return task


async def sweep(broker: Broker, now: datetime | None = None) -> int:
    """The reaper's tick: park, then report (in two transactions); returns the reports."""
    await broker.tasks.park_unmatched(now=now)
    return await broker.tasks.report_unmatched(now=now)


def parked(sql: psycopg.Connection[dict[str, Any]]) -> list[dict[str, Any]]:
    return sql.execute(
        "SELECT task_id, parked, unmatched_at FROM dispatch.tasks"
        " WHERE status = 'pending' AND unmatched_at IS NOT NULL ORDER BY queue_at"
    ).fetchall()


def walk(sql: psycopg.Connection[dict[str, Any]]) -> list[str]:
    """The titles a claim or a round would walk, in order."""
    return [r["title"] for r in sql.execute(
        "SELECT t.title FROM dispatch.pending_queue(now()) q"
        " JOIN dispatch.tasks t USING (task_id)"
    ).fetchall()]


def unmatched_events(sql: psycopg.Connection[dict[str, Any]]) -> int:
    row = sql.execute(
        "SELECT count(*) AS n FROM dispatch.task_events WHERE event = 'unmatched'"
    ).fetchone()
    assert row is not None
    return int(row["n"])


async def test_a_backlog_no_agent_can_take_leaves_the_walk_and_comes_back_for_a_new_agent(
    broker: Broker, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    await broker.agents.upsert("writer", capabilities=["prose"])
    stranded = [r["task_id"] for r in
                sql.execute(_STRANDED, {"n": 50, "key": None}).fetchall()]
    await submit(broker, "prose work", required_capabilities=["prose"])
    assert len(walk(sql)) == 51

    # The sweep parks the fifty, reports each once, and leaves them pending.
    assert await sweep(broker) == 50
    assert walk(sql) == ["prose work"]
    assert [r["task_id"] for r in parked(sql)] == stranded
    assert all(r["parked"] for r in parked(sql))
    assert unmatched_events(sql) == 50
    assert await sweep(broker) == 0  # not again before unmatched_repeat_ms
    assert {(await broker.tasks.get(t)).status for t in stranded} == {TaskStatus.PENDING}

    # An agent that can take them registers: back in line at once, in their old places.
    await broker.agents.upsert("gpu-box", capabilities=["gpu"], max_concurrent=100)
    assert parked(sql) == []
    assert walk(sql)[:2] == ["stranded 1", "stranded 2"]
    claimed = await broker.claim("gpu-box")
    assert claimed is not None and claimed.task_id == stranded[0]


async def test_a_capability_added_by_sql_brings_the_backlog_back(
    broker: Broker, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    await broker.agents.upsert("box", capabilities=["prose"])
    sql.execute(_STRANDED, {"n": 3, "key": None})
    await sweep(broker)
    assert len(parked(sql)) == 3
    sql.execute("UPDATE dispatch.agents SET capabilities = '{gpu,prose}' WHERE agent_id = 'box'")
    assert parked(sql) == []
    assert len(walk(sql)) == 3


async def test_a_device_of_the_owner_brings_its_tasks_back(
    broker: Broker, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    """With the owner filter on (the default), a task whose owner no agent belongs to is parked;
    a device of that owner (Alexandria's sync) brings it back."""
    await broker.agents.upsert("laptop", owner="bob")
    task = await submit(broker, owner="alice")
    await sweep(broker)
    assert [r["task_id"] for r in parked(sql)] == [task.task_id]
    await broker.agents.owners_sync([{"agent_id": "laptop", "owner": "alice"}], "alexandria")
    assert parked(sql) == []
    claimed = await broker.claim("laptop")
    assert claimed is not None and claimed.task_id == task.task_id


async def test_the_sweep_brings_back_what_no_trigger_saw(
    broker: Broker, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    await broker.agents.upsert("laptop", owner="bob")
    owned = await submit(broker, owner="alice")
    sql.execute(_STRANDED, {"n": 2, "key": None})
    await sweep(broker)
    assert len(parked(sql)) == 3
    # A requirement edited by hand, and the owner filter turned off: no agent row changed.
    sql.execute("UPDATE dispatch.tasks SET required_capabilities = '{}'"
                " WHERE title = 'stranded 1'")
    sql.execute("UPDATE dispatch.config SET owner_filter_enabled = false")
    assert len(parked(sql)) == 3
    await sweep(broker)
    assert set(walk(sql)) == {"a task", "stranded 1"}
    assert owned.task_id not in {r["task_id"] for r in parked(sql)}
    assert len(parked(sql)) == 1  # stranded 2 still requires gpu


async def test_a_parked_task_is_reported_again_only_after_the_repeat_interval(
    broker: Broker, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    sql.execute("UPDATE dispatch.config SET unmatched_repeat_ms = 60000")
    await broker.agents.upsert("gpu-box", capabilities=["gpu"], status=AgentStatus.STOPPED)
    task = await make_task(broker, required_capabilities=["gpu"])
    # Its only agent is stopped: reported, but not parked (the agent may come back).
    assert await sweep(broker, now=at(1)) == 1
    assert parked(sql) == []
    # The agent is removed: now parked, and not reported again so soon.
    await broker.agents.delete("gpu-box")
    assert await sweep(broker, now=at(2)) == 0
    assert [r["task_id"] for r in parked(sql)] == [task.task_id]
    assert await sweep(broker, now=at(30)) == 0
    assert await sweep(broker, now=at(61)) == 1
    assert await sweep(broker, now=at(62)) == 0
    assert unmatched_events(sql) == 2


async def test_a_key_with_room_leaves_a_task_parked_for_want_of_an_agent(
    broker: Broker, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    await broker.agents.upsert("writer", capabilities=["prose"])
    sql.execute(_STRANDED, {"n": 2, "key": "k"})
    await sweep(broker)
    assert len(parked(sql)) == 2
    row = sql.execute("SELECT dispatch.flow_unpark() AS n").fetchone()
    assert row is not None and row["n"] == 0
    assert len(parked(sql)) == 2 and walk(sql) == []


async def test_a_parked_task_cancelled_then_requeued_is_back_in_line(
    broker: Broker, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    task = await submit(broker, required_capabilities=["gpu"])
    await sweep(broker)
    assert len(parked(sql)) == 1
    sql.execute("SELECT dispatch.cancel_task(%s)", (task.task_id,))
    assert parked(sql) == []
    sql.execute("SELECT dispatch.requeue_task(%s)", (task.task_id,))
    row = sql.execute("SELECT status, parked, unmatched_at FROM dispatch.tasks"
                      " WHERE task_id = %s", (task.task_id,)).fetchone()
    assert row == {"status": "pending", "parked": False, "unmatched_at": None}
    assert walk(sql) == ["a task"]


async def test_parking_by_hand_without_a_reason_is_refused(
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    sql.execute(_STRANDED, {"n": 1, "key": None})
    try:
        sql.execute("UPDATE dispatch.tasks SET unmatched_at = now()")
    except psycopg.errors.CheckViolation as exc:
        assert exc.diag.constraint_name == "tasks_unmatched_parked"
    else:
        raise AssertionError("unmatched_at without parked was accepted")


async def test_a_registration_during_a_sweep_waits_for_it_and_brings_back_what_it_parked(
    broker: Broker, sql: psycopg.Connection[dict[str, Any]], db_url: str
) -> None:
    sql.execute(_STRANDED, {"n": 3, "key": None})
    with psycopg.connect(db_url, **CONNECT_KWARGS) as reaper:  # type: ignore[arg-type]
        with reaper.transaction():
            row = reaper.execute("SELECT dispatch.task_park_unmatched()").fetchone()
            assert row is not None and row[0] == 3
            registering = asyncio.create_task(
                broker.agents.upsert("gpu-box", capabilities=["gpu"]))
            await asyncio.sleep(0.3)
            assert not registering.done()  # it waits for the sweep's commit
        await registering
    assert parked(sql) == []
    assert len(walk(sql)) == 3


async def test_a_sweep_parks_nothing_while_a_registration_is_under_way(
    sql: psycopg.Connection[dict[str, Any]], db_url: str
) -> None:
    sql.execute(_STRANDED, {"n": 3, "key": None})
    with psycopg.connect(db_url, **CONNECT_KWARGS) as dba, dba.transaction():  # type: ignore[arg-type]
        dba.execute("SELECT dispatch.agent_upsert('gpu-box', '{gpu}')")
        row = sql.execute("SELECT dispatch.task_park_unmatched() AS n").fetchone()
        assert row == {"n": 0}
    assert parked(sql) == []
    row = sql.execute("SELECT dispatch.task_park_unmatched() AS n").fetchone()
    assert row == {"n": 0}  # the agent is there now: nothing to park
    assert len(walk(sql)) == 3


_LINE = """
INSERT INTO dispatch.tasks (title, requester, required_capabilities)
SELECT %(what)s || ' ' || g, 'req', %(needs)s FROM generate_series(1, %(n)s) g
"""


async def test_each_sweep_looks_at_a_share_of_a_long_line_and_the_next_goes_on_from_there(
    broker: Broker, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    """A deep backlog costs each tick a bounded walk (p_rows), not one of the whole line: a
    stranded task behind 30 others is parked by the second sweep of 20 rows; the one after it
    starts from the front again."""
    await broker.agents.upsert("writer", capabilities=["prose"], max_concurrent=1)
    sql.execute(_LINE, {"what": "prose", "needs": ["prose"], "n": 30})
    sql.execute(_STRANDED, {"n": 5, "key": None})

    def sweep_rows(rows: int) -> int:
        row = sql.execute("SELECT dispatch.task_park_unmatched(now(), %s) AS n", (rows,)).fetchone()
        assert row is not None
        return int(row["n"])

    assert sweep_rows(20) == 0  # prose 1 .. 20
    assert sweep_rows(20) == 5  # prose 21 .. 30, then the five stranded
    assert sql.execute("SELECT * FROM dispatch.unmatched_walks").fetchall() == []  # at the end
    sql.execute(_STRANDED, {"n": 1, "key": None})
    assert sweep_rows(20) == 0  # from the front: prose 1 .. 20
    assert sweep_rows(20) == 1


async def test_each_report_looks_at_a_share_of_a_long_line_and_the_next_goes_on_from_there(
    broker: Broker, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    """The same for the report, here of tasks whose only capable agent is drained (reported,
    not parked)."""
    await broker.agents.upsert("writer", capabilities=["prose"], max_concurrent=1)
    await broker.agents.upsert("artist", capabilities=["draw"])
    await broker.agents.drain("artist")
    sql.execute(_LINE, {"what": "prose", "needs": ["prose"], "n": 30})
    sql.execute(_LINE, {"what": "drawing", "needs": ["draw"], "n": 3})

    def report_rows(rows: int) -> int:
        row = sql.execute("SELECT dispatch.task_report_unmatched(now(), 100, %s) AS n",
                          (rows,)).fetchone()
        assert row is not None
        return int(row["n"])

    assert report_rows(20) == 0
    assert report_rows(20) == 3
    assert unmatched_events(sql) == 3
    assert report_rows(20) == 0 and report_rows(20) == 0  # reported once
    assert parked(sql) == []
