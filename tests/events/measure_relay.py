"""Measures the event relay (not a test): events/s it sustains draining a backlog, and the catch-up
time after a NATS outage of 1,000 events. Real Postgres (as the tests get it) and real nats-server.

    .venv/bin/python -m tests.events.measure_relay [--events 20000] [--outage-events 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg_pool import AsyncConnectionPool

from dispatch.broker import Broker
from dispatch.db import CONNECT_KWARGS, create_pool
from dispatch.events.connection import NatsConnection
from dispatch.events.relay import Relay
from dispatch.notify import Listener
from dispatch.store import Store
from tests import pg
from tests.natsfix import NatsServer

# One full lifecycle = 4 events (created, assigned, started, completed) and 5 messages (the
# assignment also goes to the agent's subject).
LIFECYCLES = """
DO $$
DECLARE t dispatch.tasks;
BEGIN
    PERFORM dispatch.agent_upsert('bench-agent', p_max_concurrent => 1000);
    FOR i IN 1..%s LOOP
        INSERT INTO dispatch.tasks (title) VALUES ('bench ' || i);
        SELECT * INTO t FROM dispatch.task_claim('bench-agent', NULL, now());
        PERFORM dispatch.task_start(t.task_id, 'bench-agent', now());
        PERFORM dispatch.task_complete(t.task_id, 'bench-agent', '{"ok": true}', false, now());
    END LOOP;
END $$
"""


def make_events(url: str, lifecycles: int) -> None:
    with psycopg.connect(url, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
        conn.execute(LIFECYCLES % int(lifecycles))  # type: ignore[arg-type]


def unpublished(url: str) -> int:
    with psycopg.connect(url, **CONNECT_KWARGS) as conn:  # type: ignore[arg-type]
        row = conn.execute(
            "SELECT count(*) FROM dispatch.task_events WHERE published_at IS NULL"
        ).fetchone()
    assert row is not None
    return int(row[0])


async def wait_drained(url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while unpublished(url):
        if time.monotonic() > deadline:
            raise TimeoutError("relay did not drain the backlog")
        await asyncio.sleep(0.01)


async def run_relay(
    pool: AsyncConnectionPool, listener: Listener, nats_url: str  # type: ignore[type-arg]
) -> tuple[NatsConnection, Relay]:
    conn = NatsConnection(nats_url)
    await conn.start()
    relay = Relay(Broker(Store(pool)), listener, conn, poll_interval=5.0)
    await relay.start()
    return conn, relay


async def measure(url: str, nats: NatsServer, events: int, outage_events: int) -> None:
    pool = create_pool(url, min_size=1, max_size=4)
    await pool.open(wait=True)
    listener = Listener(url)
    await listener.start()

    # 1. Throughput: a backlog written while no relay runs, then drained.
    make_events(url, events // 4)
    backlog = unpublished(url)
    conn, relay = await run_relay(pool, listener, nats.url)
    assert await conn.wait_connected(10)
    t0 = time.perf_counter()
    await wait_drained(url)
    elapsed = time.perf_counter() - t0
    print(f"throughput: {backlog} events ({backlog * 5 // 4} messages) in {elapsed:.2f}s = "
          f"{backlog / elapsed:,.0f} events/s")

    # 2. Outage: NATS stops, the events pile up in the log, NATS comes back.
    nats.stop()
    await asyncio.wait_for(conn.disconnected.wait(), 10)
    make_events(url, outage_events // 4)
    backlog = unpublished(url)
    t0 = time.perf_counter()
    nats.start()
    t_up = time.perf_counter() - t0
    await asyncio.wait_for(conn.connected.wait(), 30)
    t_conn = time.perf_counter() - t0
    await wait_drained(url)
    total = time.perf_counter() - t0
    print(f"catch-up after an outage: {backlog} events published {total:.2f}s after nats-server "
          f"was started (server ready {t_up:.2f}s, relay reconnected {t_conn:.2f}s, "
          f"drained {total - t_conn:.2f}s after reconnecting)")

    await relay.stop()
    await conn.stop()
    await listener.stop()
    await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--outage-events", type=int, default=1000)
    args = parser.parse_args()
    with pg.server_url() as server:
        pg.create_template(server)
        url = pg.clone_database(server)
        nats = NatsServer(Path(tempfile.mkdtemp(prefix="dispatch-measure-nats-")))
        nats.start()
        try:
            asyncio.run(measure(url, nats, args.events, args.outage_events))
        finally:
            nats.stop()
            pg.drop_database(server, url)


if __name__ == "__main__":
    main()
