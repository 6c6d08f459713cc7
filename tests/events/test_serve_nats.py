"""`dispatch serve` with hermes.url set, as a real process: health, inbound, relay, NATS outage."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psycopg
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from tests.events.conftest import eventually
from tests.events.streamread import read_stream
from tests.natsfix import NatsServer
from tests.serve import serving

Sql = psycopg.Connection[dict[str, Any]]


def health(ops: str) -> dict[str, Any]:
    r = httpx.get(f"{ops}/health", timeout=5)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def metric(ops: str, name: str) -> float:
    text = httpx.get(f"{ops}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not in /metrics")


async def _check(fn: Any) -> bool:
    return bool(await asyncio.to_thread(fn))


async def test_serve_relays_takes_requests_and_survives_a_nats_outage(
    db_url: str, tmp_path: Path, nats_server: NatsServer, client: Client, sql: Sql
) -> None:
    with serving(db_url, tmp_path, env={"DISPATCH_HERMES_URL": nats_server.url}) as sp:
        await eventually(lambda: _check(lambda: health(sp.ops)["nats"] == "ok"), what="nats ok")
        reply = await client.request(
            "swarm.task.request",
            msgspec.json.encode({"title": "over nats", "requester": "req"}),
            timeout=10,
        )
        first = msgspec.json.decode(reply.data)
        assert first["source"] == "nats"

        async def first_published() -> bool:
            try:
                stored = await read_stream(client)
            except Exception:
                return False
            return f"swarm.task.{first['task_id']}.created" in {m.subject for m in stored}

        await eventually(first_published, what="created event in the stream")

        nats_server.stop()
        await eventually(lambda: _check(lambda: health(sp.ops)["nats"] == "down"), what="down")
        # The API keeps working; the event waits in the log and shows as backlog.
        r = httpx.post(
            f"{sp.api}/api/v1/tasks", json={"title": "during the outage"},
            headers={"X-Agent-ID": "req"}, timeout=10,
        )
        assert r.status_code == 201, r.text
        second = r.json()
        assert metric(sp.ops, "dispatch_event_log_unpublished") >= 1
        await eventually(
            lambda: _check(lambda: metric(sp.ops, "dispatch_nats_publish_failures_total") > 0),
            what="publish failure counted",
        )

        nats_server.start()
        await eventually(lambda: _check(lambda: health(sp.ops)["nats"] == "ok"), what="nats back")
        await eventually(
            lambda: _check(lambda: metric(sp.ops, "dispatch_event_log_unpublished") == 0),
            what="backlog published",
        )
        await eventually(lambda: _check(lambda: client.is_connected), what="client reconnected")
        subjects = [m.subject for m in await read_stream(client)]
        assert subjects.count(f"swarm.task.{second['task_id']}.created") == 1
        assert subjects.count(f"swarm.task.{first['task_id']}.created") == 1
        assert health(sp.ops)["event_relay"] == "ok"


async def test_serve_starts_while_nats_is_down_and_connects_when_it_comes(
    db_url: str, tmp_path: Path, nats_later: NatsServer
) -> None:
    nats_server = nats_later
    with serving(db_url, tmp_path, env={"DISPATCH_HERMES_URL": nats_server.url}) as sp:
        assert health(sp.ops)["nats"] == "down"
        r = httpx.post(
            f"{sp.api}/api/v1/tasks", json={"title": "no NATS yet"},
            headers={"X-Agent-ID": "req"}, timeout=10,
        )
        assert r.status_code == 201, r.text
        nats_server.start()
        await eventually(lambda: _check(lambda: health(sp.ops)["nats"] == "ok"), what="nats ok")
        await eventually(
            lambda: _check(lambda: metric(sp.ops, "dispatch_event_log_unpublished") == 0),
            what="the waiting event published",
        )
