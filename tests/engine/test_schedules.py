"""The scheduler against real Postgres, on an injected clock: daylight saving time, overlap,
catch-up after an outage, two schedulers at once, and schedules a DBA writes in psql."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from dispatch.broker import Broker
from dispatch.engine.scheduler import Scheduler
from dispatch.models import Cancel

Sql = psycopg.Connection[dict[str, Any]]


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def add(sql: Sql, name: str, cron: str, **fields: object) -> None:
    template = json.dumps({"title": f"{name} run"})
    cols = {"name": name, "cron": cron, "template": template, **fields}
    sql.execute(
        f"INSERT INTO dispatch.schedules ({', '.join(cols)})"
        f" VALUES ({', '.join(['%s'] * len(cols))})", list(cols.values()),
    )


def fires(sql: Sql, name: str) -> list[datetime]:
    """The fire times of the tasks the schedule made, in order."""
    rows = sql.execute(
        "SELECT (metadata->>'fire_at')::timestamptz AS at FROM dispatch.tasks"
        " WHERE requester = %s ORDER BY 1", ("schedule:" + name,),
    ).fetchall()
    return [r["at"] for r in rows]


def schedule(sql: Sql, name: str) -> dict[str, Any]:
    row = sql.execute("SELECT * FROM dispatch.schedules WHERE name = %s", (name,)).fetchone()
    assert row is not None
    return row


async def walk(scheduler: Scheduler, start: datetime, end: datetime, step: timedelta) -> None:
    """Run the scheduler at every step from start to end, as a clock would."""
    now = start
    while now <= end:
        await scheduler.run_once(now=now)
        now += step


async def test_a_skipped_hour_does_not_fire_and_a_repeated_hour_fires_once(
    broker: Broker, sql: Sql
) -> None:
    """New York, 2026: clocks go from 02:00 to 03:00 on March 8 and from 02:00 back to 01:00 on
    November 1. A daily 02:30 does not fire on March 8; a daily 01:30 fires once on November 1;
    an hourly schedule makes 23 tasks on March 8 and 25 on November 1."""
    zone = "America/New_York"
    add(sql, "daily_0230", "30 2 * * *", timezone=zone, overlap="allow")
    add(sql, "daily_0130", "30 1 * * *", timezone=zone, overlap="allow")
    add(sql, "hourly", "0 * * * *", timezone=zone, overlap="allow")
    scheduler = Scheduler(broker)
    step = timedelta(minutes=10)
    await walk(scheduler, at("2026-03-07T00:00:00-05:00"), at("2026-03-10T00:00:00-04:00"), step)
    assert fires(sql, "daily_0230") == [
        at("2026-03-07T02:30:00-05:00"), at("2026-03-09T02:30:00-04:00")]
    march_8 = [f for f in fires(sql, "hourly")
               if at("2026-03-08T00:00:00-05:00") <= f < at("2026-03-09T00:00:00-04:00")]
    assert len(march_8) == 23
    sql.execute("DELETE FROM dispatch.tasks")
    sql.execute("UPDATE dispatch.schedules SET next_fire_at = NULL")  # no catch-up across walks
    await walk(scheduler, at("2026-10-31T00:00:00-04:00"), at("2026-11-03T00:00:00-05:00"), step)
    assert fires(sql, "daily_0130") == [
        at("2026-10-31T01:30:00-04:00"), at("2026-11-01T01:30:00-04:00"),
        at("2026-11-02T01:30:00-05:00")]
    november_1 = [f for f in fires(sql, "hourly")
                  if at("2026-11-01T00:00:00-04:00") <= f < at("2026-11-02T00:00:00-05:00")]
    assert len(november_1) == 25
    assert len(set(november_1)) == 25


async def test_overlap_skip_makes_no_task_while_the_last_one_is_unfinished(
    broker: Broker, sql: Sql
) -> None:
    add(sql, "long_job", "* * * * *", overlap="skip")
    add(sql, "short_job", "* * * * *", overlap="allow")
    scheduler = Scheduler(broker)
    await scheduler.run_once(now=at("2026-06-01T12:00:30+00:00"))  # computes the next fires
    await scheduler.run_once(now=at("2026-06-01T12:01:01+00:00"))
    [first] = fires(sql, "long_job")
    await scheduler.run_once(now=at("2026-06-01T12:02:01+00:00"))
    await scheduler.run_once(now=at("2026-06-01T12:03:01+00:00"))
    assert fires(sql, "long_job") == [first]
    assert len(fires(sql, "short_job")) == 3
    row = schedule(sql, "long_job")
    assert row["skipped_count"] == 2 and row["fired_count"] == 1
    skips = sql.execute(
        "SELECT payload->>'fire_at' AS at FROM dispatch.task_events"
        " WHERE event = 'schedule_skipped' AND task_id = %s", (row["last_task_id"],),
    ).fetchall()
    assert len(skips) == 2  # the running task's timeline says what it held back
    await broker.apply(
        Cancel(task_id=row["last_task_id"], actor="admin", reason="done", admin=True)
    )
    await scheduler.run_once(now=at("2026-06-01T12:04:01+00:00"))
    assert fires(sql, "long_job") == [first, at("2026-06-01T12:04:00+00:00")]


@pytest.mark.parametrize(
    ("catch_up", "limit", "made", "missed"),
    [("none", 100, [], 10), ("latest", 100, [10], 9),
     ("all", 100, list(range(1, 11)), 0), ("all", 3, [8, 9, 10], 7)],
)
async def test_catch_up_after_a_ten_minute_outage(
    broker: Broker, sql: Sql, catch_up: str, limit: int, made: list[int], missed: int
) -> None:
    """Every minute, last fired at 12:00; no scheduler runs until 12:10:40. none makes nothing
    (12:10 is 40 s late), latest makes 12:10, all makes every missed fire up to the limit."""
    add(sql, "minutely", "* * * * *", overlap="allow", catch_up=catch_up, catch_up_limit=limit)
    scheduler = Scheduler(broker)
    await scheduler.run_once(now=at("2026-06-01T11:59:30+00:00"))
    await scheduler.run_once(now=at("2026-06-01T12:00:01+00:00"))
    assert fires(sql, "minutely") == [at("2026-06-01T12:00:00+00:00")]
    await scheduler.run_once(now=at("2026-06-01T12:10:40+00:00"))
    after = fires(sql, "minutely")[1:]
    assert after == [at("2026-06-01T12:00:00+00:00") + timedelta(minutes=m) for m in made]
    row = schedule(sql, "minutely")
    assert row["missed_count"] == missed
    assert row["next_fire_at"] == at("2026-06-01T12:11:00+00:00")


async def test_a_fire_just_late_is_made_under_catch_up_none(broker: Broker, sql: Sql) -> None:
    add(sql, "prompt", "* * * * *", catch_up="none")
    scheduler = Scheduler(broker)
    await scheduler.run_once(now=at("2026-06-01T11:59:30+00:00"))
    await scheduler.run_once(now=at("2026-06-01T12:00:02+00:00"))  # a replica taking over
    assert fires(sql, "prompt") == [at("2026-06-01T12:00:00+00:00")]


async def test_two_schedulers_at_the_same_instant_make_each_fire_once(
    broker: Broker, sql: Sql
) -> None:
    add(sql, "busy", "* * * * * */5", overlap="allow", catch_up="all")
    one, two = Scheduler(broker), Scheduler(broker)
    await one.run_once(now=at("2026-06-01T12:00:00.5+00:00"))
    for second in range(1, 60, 2):
        now = at("2026-06-01T12:00:00+00:00") + timedelta(seconds=second)
        await asyncio.gather(one.run_once(now=now), two.run_once(now=now))
    made = fires(sql, "busy")
    assert made == [at("2026-06-01T12:00:05+00:00") + timedelta(seconds=5 * i) for i in range(11)]


async def test_a_schedule_written_in_psql_is_computed_and_a_bad_one_paused(
    broker: Broker, sql: Sql
) -> None:
    add(sql, "from_psql", "*/15 * * * *", timezone="Europe/Berlin")
    add(sql, "typo", "61 * * * *")
    add(sql, "nowhere", "0 * * * *", timezone="Mars/Olympus_Mons")
    scheduler = Scheduler(broker)
    await scheduler.run_once(now=at("2026-06-01T12:07:00+00:00"))
    assert schedule(sql, "from_psql")["next_fire_at"] == at("2026-06-01T12:15:00+00:00")
    typo, nowhere = schedule(sql, "typo"), schedule(sql, "nowhere")
    assert typo["paused"] and "61 * * * *" in typo["last_error"]
    assert nowhere["paused"] and "Mars/Olympus_Mons" in nowhere["last_error"]
    # A changed timing applies from the next look on: the old next fire is forgotten.
    sql.execute("UPDATE dispatch.schedules SET cron = '0 18 * * *' WHERE name = 'from_psql'")
    assert schedule(sql, "from_psql")["next_fire_at"] is None
    await scheduler.run_once(now=at("2026-06-01T12:08:00+00:00"))
    assert schedule(sql, "from_psql")["next_fire_at"] == at("2026-06-01T16:00:00+00:00")
    # Fixing the typo and resuming: it fires from then on, with the error cleared.
    sql.execute("UPDATE dispatch.schedules SET cron = '1 * * * *', paused = false"
                " WHERE name = 'typo'")
    await scheduler.run_once(now=at("2026-06-01T12:08:00+00:00"))
    typo = schedule(sql, "typo")
    assert not typo["paused"] and typo["last_error"] is None
    assert typo["next_fire_at"] == at("2026-06-01T13:01:00+00:00")


async def test_a_template_refused_at_fire_time_pauses_the_schedule(
    broker: Broker, sql: Sql
) -> None:
    """A DBA's template that the create refuses (a priority out of range) does not stop the
    other schedules: that one is paused, saying why."""
    add(sql, "bad", "* * * * *")
    add(sql, "good", "* * * * *")  # overlap skip: its first task, still pending, holds the rest
    sql.execute("""UPDATE dispatch.schedules SET template = '{"title": "x", "priority": 99}'
                   WHERE name = 'bad'""")
    scheduler = Scheduler(broker)
    await scheduler.run_once(now=at("2026-06-01T11:59:30+00:00"))
    await scheduler.run_once(now=at("2026-06-01T12:00:01+00:00"))
    bad = schedule(sql, "bad")
    assert bad["paused"] and "priority" in bad["last_error"]
    assert fires(sql, "good") == [at("2026-06-01T12:00:00+00:00")]
    assert fires(sql, "bad") == []


async def test_run_now_and_pause_in_sql(broker: Broker, sql: Sql) -> None:
    add(sql, "manual", "0 0 1 1 *")
    task = sql.execute("SELECT * FROM dispatch.schedule_run_now('manual')").fetchone()
    assert task is not None and task["title"] == "manual run" and task["source"] == "schedule"
    assert task["requester"] == "schedule:manual" and task["metadata"]["schedule"] == "manual"
    assert sql.execute("SELECT paused FROM dispatch.schedule_pause('manual')").fetchone() == {
        "paused": True}
    with pytest.raises(psycopg.Error, match="schedule absent does not exist") as err:
        sql.execute("SELECT dispatch.schedule_pause('absent')")
    assert err.value.sqlstate == "UD404"
