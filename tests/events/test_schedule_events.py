"""A schedule's fires and skips reach NATS: on the task's subject and on the schedule's own,
swarm.dispatch.schedule.<name>.fired|skipped, which a consumer of one schedule subscribes to."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
from nats.aio.client import Client

from dispatch.broker import Broker
from dispatch.engine.scheduler import Scheduler
from dispatch.events.relay import Relay
from tests.events.conftest import eventually, unpublished
from tests.events.streamread import read_stream

Sql = psycopg.Connection[dict[str, Any]]


async def test_fires_and_skips_are_published_on_the_schedule_subject(
    broker: Broker, relay: Relay, client: Client, sql: Sql
) -> None:
    sql.execute(
        "INSERT INTO dispatch.schedules (name, cron, template, overlap)"
        """ VALUES ('feed-poll', '*/5 * * * *', '{"title": "poll the feed"}', 'skip')"""
    )
    scheduler = Scheduler(broker)
    await scheduler.run_once(now=datetime(2026, 6, 1, 12, 3, tzinfo=UTC))
    await scheduler.run_once(now=datetime(2026, 6, 1, 12, 5, 1, tzinfo=UTC))  # fires 12:05
    await scheduler.run_once(now=datetime(2026, 6, 1, 12, 10, 1, tzinfo=UTC))  # 12:05's runs

    async def settled() -> bool:
        return unpublished(sql) == 0

    await eventually(settled, 30, "every event published")
    stored = await read_stream(client)
    fired = [m for m in stored if m.subject == "swarm.dispatch.schedule.feed-poll.fired"]
    skipped = [m for m in stored if m.subject == "swarm.dispatch.schedule.feed-poll.skipped"]
    assert len(fired) == 1 and len(skipped) == 1
    task_id = fired[0].body["task_id"]
    assert fired[0].body["event"] == "schedule_fired"
    assert fired[0].body["fire_at"].startswith("2026-06-01T12:05:00")
    assert fired[0].body["task"]["title"] == "poll the feed"
    # The skip is told on the task that held it back, too.
    assert skipped[0].body["task_id"] == task_id
    assert skipped[0].body["fire_at"].startswith("2026-06-01T12:10:00")
    subjects = {m.subject for m in stored}
    assert f"swarm.task.{task_id}.created" in subjects
    assert f"swarm.task.{task_id}.schedule_fired" in subjects
