"""Wires one `dispatch serve` process: database, broker, background loops, API and ops servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import uvicorn
from psycopg_pool import AsyncConnectionPool

from dispatch import db
from dispatch.api.protocol import protocol_class
from dispatch.banner import OPS_SOCKET_ENV, banner, print_banner, supervised
from dispatch.broker import Broker
from dispatch.metrics import Metrics
from dispatch.migrate import migrate
from dispatch.notify import NOTIFY_SOCKET_ENV, Listener
from dispatch.preflight import (
    check_listen,
    check_pool_mode,
    check_sessions,
    connection_plan,
    session_url,
)
from dispatch.replica import ReadRoute, ReplicaMonitor
from dispatch.settings import Settings
from dispatch.store import Store
from dispatch.tracing import Tracing, tracing_from

if TYPE_CHECKING:
    from litestar import Litestar, Router

    from dispatch.ui.hub import Hub

log = logging.getLogger(__name__)


class Loop(Protocol):
    """A background loop: started after the database is ready, stopped before it closes."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def resolve_database_url(settings: Settings) -> str:
    """The configured database, or the embedded Postgres in data_dir."""
    return settings.database.url or db.start_embedded(settings.data_dir)


def _shared_socket(host: str, port: int) -> socket.socket:
    """A listening socket other processes may bind too (SO_REUSEPORT: the kernel spreads new
    connections over them)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the Service owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def web_app(
    settings: Settings,
    broker: Broker,
    *,
    admin_token: str | None = None,
    listener: Listener | None = None,
    metrics: Metrics | None = None,
    tracing: Tracing | None = None,
) -> Litestar:
    """The API on port 8600, with the dashboard under /ui when ui.enabled."""
    from dispatch.api.app import create_app

    token = admin_token or settings.server.admin_token
    mounts: list[Router] = []
    state: dict[str, object] = {}
    if settings.ui.enabled:
        # Imported here: jinja2 and the templates are needed only where the dashboard is served.
        from dispatch.ui.views import create_ui

        router, state["ui"] = create_ui(
            settings.ui, broker, token, listener=listener, metrics=metrics
        )
        mounts.append(router)
    return create_app(
        settings, broker, admin_token=token, listener=listener, metrics=metrics,
        tracing=tracing, mounts=mounts, state=state,
    )


class Service:
    """Everything one process runs. `start()` is ready when both ports accept connections.
    `tracing` replaces the one the settings ask for (tests pass one that keeps its spans)."""

    def __init__(self, settings: Settings, *, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.database_url = ""
        self.metrics = Metrics()
        self.tracing = tracing if tracing is not None else tracing_from(settings.tracing)
        self.pool: AsyncConnectionPool[Any] | None = None
        self.read_pool: AsyncConnectionPool[Any] | None = None
        self.replica: ReplicaMonitor | None = None
        self.probe: db.HealthProbe | None = None
        self.listener: Listener | None = None
        self.broker: Broker | None = None
        self.loops: list[Loop] = []
        self.servers: list[_Server] = []
        # The dashboard's live streams, ended before the servers stop: uvicorn waits for open
        # responses, and an event stream stays open until its client goes.
        self.hubs: list[Hub] = []
        self._server_tasks: list[asyncio.Task[None]] = []
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        s = self.settings
        check_pool_mode(s.database)
        self.database_url = await asyncio.to_thread(resolve_database_url, s)
        session = session_url(s.database, self.database_url)
        if not s.server.reuse_port:  # a worker of serve --workers: its supervisor checked
            await asyncio.to_thread(check_listen, s.database, self.database_url)
        applied = await asyncio.to_thread(migrate, session)
        if applied:
            log.info("migrations applied: %s", applied)
        if not s.server.reuse_port:  # one process alone: the budget is all its own
            plan = await asyncio.to_thread(connection_plan, session, s, 1)
            s = self.settings = msgspec.structs.replace(s, database=msgspec.structs.replace(
                s.database, pool_min=plan.pool_min, pool_max=plan.pool_max))
        self.pool = db.create_pool(self.database_url, s.database)
        await self.pool.open(wait=True, timeout=30)
        self.probe = db.HealthProbe(self.database_url)
        # A worker of serve --workers N hears its supervisor's one LISTEN.
        self.listener = Listener(session, relay=os.environ.get(NOTIFY_SOCKET_ENV, ""))
        await self.listener.start()
        await check_sessions(self.pool, s.database)
        store = Store(self.pool)
        reads = store
        if s.database.read_url:
            # Opened without waiting: a replica that is down delays nothing (reads stay on the
            # primary until the monitor finds it).
            self.read_pool = db.create_pool(
                s.database.read_url, msgspec.structs.replace(s.database, pool_mode="session"),
                min_size=1, max_size=max(2, s.database.pool_max // 2),
            )
            await self.read_pool.open(wait=False)
            self.replica = ReplicaMonitor(
                ReadRoute(self.pool, self.read_pool), max_lag_ms=s.database.read_max_lag_ms
            )
            reads = Store(self.replica.route)  # type: ignore[arg-type]  # pool-shaped
        self.broker = Broker(
            store, listener=self.listener, assignment=s.assignment, metrics=self.metrics,
            reads=reads, replica=self.replica.status if self.replica is not None else None,
            tracing=self.tracing,
        )
        await self.broker.apply_config()
        self.loops = self._build_loops()
        for loop in self.loops:
            await loop.start()
        await self._start_servers()

    def _build_loops(self) -> list[Loop]:
        """The background loops that this configuration runs."""
        assert self.broker is not None
        from dispatch.engine.assigner import Assigner, Waker
        from dispatch.engine.directory import DirectorySync
        from dispatch.engine.pruner import Pruner
        from dispatch.engine.reaper import Reaper
        from dispatch.engine.scheduler import Scheduler
        from dispatch.integrations.alexandria import AlexandriaClient
        from dispatch.integrations.promptforge import PromptForgeClient
        from dispatch.integrations.warren import WarrenClient

        s = self.settings
        warren = WarrenClient(s.warren.url, s.warren.token) if s.warren.url else None
        loops: list[Loop] = [
            Assigner(
                self.broker, self.listener, metrics=self.metrics,
                waker=Waker(warren.wake) if warren is not None else None,
            ),
            Reaper(self.broker, self.listener),
            DirectorySync(
                self.broker,
                warren=warren,
                promptforge=PromptForgeClient(s.promptforge.url) if s.promptforge.url else None,
                alexandria=AlexandriaClient(s.alexandria.url) if s.alexandria.url else None,
                refresh_ms=s.directory.refresh_ms,
                stale_ms=s.directory.stale_ms,
                metrics=self.metrics,
            ),
            Pruner(self.broker, retention_hours=s.retention.hours),
            Scheduler(self.broker, self.listener),
            *([self.replica] if self.replica is not None else []),
        ]
        self.broker.pushing = True  # waiting claims wake for what the assigner gives them
        loops += self._nats_loops()
        return loops

    def _nats_loops(self) -> list[Loop]:
        """With hermes.url set: the NATS connection (its health() is /health's nats), the event
        relay and the inbound subscriptions. Without it, events stay in the log."""
        if not self.settings.hermes.url:
            return []
        from dispatch.events.connection import NatsConnection
        from dispatch.events.inbound import NatsInbound
        from dispatch.events.relay import Relay

        assert self.pool is not None and self.listener is not None and self.broker is not None
        conn = NatsConnection(self.settings.hermes.url)
        poll = self.settings.hermes.poll_interval_ms / 1000
        relay = Relay(
            self.broker, self.listener, conn, metrics=self.metrics, poll_interval=poll,
            tracing=self.tracing,
        )
        # Started in this order, stopped in reverse: inbound and relay before the connection.
        return [conn, relay, NatsInbound(conn, self.broker)]

    async def _start_servers(self) -> None:
        from dispatch.api.ops import create_ops_app

        assert self.broker is not None
        s = self.settings
        admin_token = s.server.admin_token or secrets.token_urlsafe(32)  # shown by the banner
        api_app = web_app(
            s, self.broker, admin_token=admin_token, listener=self.listener,
            metrics=self.metrics, tracing=self.tracing,
        )
        self.hubs.append(api_app.state["follow"])  # the API's followed tasks
        dashboard = api_app.state.get("ui")
        if dashboard is not None:
            self.hubs.append(dashboard.hub)
            # A new admin token ends the sessions signed with the old one, on every replica.
            ended = await dashboard.sessions.retire_other_keys()
            if ended:
                log.info("dashboard sessions of another admin token ended: %d", ended)
        apps = [
            (api_app, s.server.port),
            (create_ops_app(self), s.server.metrics_port),
        ]
        # A worker of serve --workers N: its ops app is on its socket; the supervisor serves the
        # metrics port for all of them.
        ops_socket = os.environ.get(OPS_SOCKET_ENV)
        for i, (app, port) in enumerate(apps):
            config = uvicorn.Config(
                app, host=s.server.host, port=port, log_config=None, access_log=False,
                lifespan="on", loop="none",
                http=protocol_class(s.server.read_timeout_ms / 1000),
                timeout_keep_alive=max(1, s.server.keep_alive_ms // 1000),
                uds=ops_socket if i == 1 else None,
            )
            server = _Server(config)
            self.servers.append(server)
            # The API port of a `serve --workers N` worker is shared with its siblings.
            shared = i == 0 and s.server.reuse_port
            sockets = [_shared_socket(s.server.host, port)] if shared else None
            self._server_tasks.append(asyncio.create_task(server.serve(sockets=sockets)))
        while not all(server.started for server in self.servers):
            if any(t.done() for t in self._server_tasks):
                for t in self._server_tasks:
                    if t.done() and t.exception():
                        raise t.exception()  # type: ignore[misc]
                raise RuntimeError("an HTTP server stopped during start-up (port in use?)")
            await asyncio.sleep(0.02)
        log.info(
            "dispatch serving", extra={"port": s.server.port, "metrics_port": s.server.metrics_port}
        )
        if not supervised():
            print_banner(banner(s, admin_token, generated=not s.server.admin_token))

    async def health(self) -> tuple[bool, dict[str, object]]:
        """(database reachable, report) for GET /health. The database is checked on the probe's
        own connection; the pool's state is reported beside it (`waiting` > 0 for long: requests
        queue for a connection, e.g. behind rows another session keeps locked)."""
        report: dict[str, object] = {"status": "ok"}
        assert self.probe is not None and self.pool is not None
        report["database"] = await self.probe.status()
        ok = report["database"] == "ok"
        if not ok:
            report["status"] = "degraded"
        stats = self.pool.get_stats()
        report["database_pool"] = {
            "size": stats.get("pool_size", 0),
            "idle": stats.get("pool_available", 0),
            "waiting": stats.get("requests_waiting", 0),
        }
        report["nats"] = "disabled"
        for loop in self.loops:
            extra = getattr(loop, "health", None)
            if callable(extra):
                report.update(extra())
        return ok, report

    async def gauges(self) -> dict[str, object]:
        """The queue gauges read from the database at scrape time (GET /metrics)."""
        assert self.pool is not None and self.broker is not None
        # A scrape does not queue for long behind busy requests: it reports database_up 0.
        reads = self.broker.reads
        async with db.connection(reads.pool, timeout=2.0) as conn:
            return await reads.insights.metrics_gauges(conn=conn)

    async def stop(self) -> None:
        if self.broker is not None:
            self.broker.closing.set()  # long polls answer now instead of holding the shutdown
        for hub in self.hubs:
            await hub.close()
        for server in self.servers:
            server.should_exit = True
        if self._server_tasks:
            await asyncio.gather(*self._server_tasks, return_exceptions=True)
        for loop in reversed(self.loops):
            try:
                await loop.stop()
            except Exception:
                log.exception("error stopping %s", type(loop).__name__)
        if self.listener is not None:
            await self.listener.stop()
        if self.probe is not None:
            await self.probe.close()
        if self.read_pool is not None:
            await self.read_pool.close()
        if self.pool is not None:
            await self.pool.close()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # the spans not exported yet
        self.stopped.set()

    async def run(self) -> None:
        """Start, serve until SIGINT/SIGTERM, stop."""
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, done.set)
        try:
            await self.start()
            await done.wait()
        finally:
            await self.stop()
