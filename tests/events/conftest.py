"""Fixtures for the NATS tests: a real nats-server (tests.natsfix), the process's NATS connection,
a LISTEN connection, the relay and the inbound subscriptions, and a plain client as an outsider
(an agent, a requester or a consumer of the stream) would use it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import psycopg
import pytest
from nats.aio.client import Client
from psycopg_pool import AsyncConnectionPool

from dispatch.broker import Broker
from dispatch.events.connection import NatsConnection
from dispatch.events.inbound import NatsInbound
from dispatch.events.relay import Relay
from dispatch.metrics import Metrics
from dispatch.notify import Listener
from dispatch.store import Store
from tests.natsfix import NatsServer, nats_server
from tests.poll import until

__all__ = ["nats_server"]


@pytest.fixture
async def listener(db_url: str) -> AsyncIterator[Listener]:
    lst = Listener(db_url)
    await lst.start()
    yield lst
    await lst.stop()


@pytest.fixture
async def nats_conn(nats_server: NatsServer) -> AsyncIterator[NatsConnection]:
    conn = NatsConnection(nats_server.url)
    await conn.start()
    assert await conn.wait_connected(10)
    yield conn
    await conn.stop()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def relay(
    pool: AsyncConnectionPool[Any], listener: Listener, nats_conn: NatsConnection, metrics: Metrics
) -> AsyncIterator[Relay]:
    # A poll interval far beyond any test's deadline: only NOTIFY can wake the relay in time.
    r = Relay(Broker(Store(pool)), listener, nats_conn, metrics=metrics, poll_interval=600)
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
async def inbound(nats_conn: NatsConnection, broker: Broker) -> AsyncIterator[NatsInbound]:
    ib = NatsInbound(nats_conn, broker)
    await ib.start()
    await asyncio.wait_for(ib.subscribed.wait(), 10)
    yield ib
    await ib.stop()


@pytest.fixture
async def client(nats_server: NatsServer) -> AsyncIterator[Client]:
    """An outsider's connection (agent, requester, consumer)."""
    nc = await nats.connect(
        nats_server.url, allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.2
    )
    yield nc
    await nc.close()


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 30.0, what: str = "condition"
) -> None:
    """Wait (with a deadline, not a fixed sleep) until check() is true."""
    await until(check, what, timeout, every=0.02)


def unpublished(sql: psycopg.Connection[dict[str, Any]]) -> int:
    row = sql.execute(
        "SELECT count(*) AS n FROM dispatch.task_events WHERE published_at IS NULL"
    ).fetchone()
    assert row is not None
    return int(row["n"])


@pytest.fixture
def nats_later(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server that is not started yet (the test starts it); stopped at the end."""
    server = NatsServer(tmp_path / "nats-later")
    try:
        yield server
    finally:
        server.stop()
