"""The process's one NATS connection, connecting and reconnecting in the background."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from dispatch.loop import cancel_task

log = logging.getLogger(__name__)


class NatsConnection:
    """The process's NATS connection. `start()` returns at once: when NATS is down the first
    connection is retried in the background, and afterwards nats-py reconnects forever. `health()`
    is what GET /health reports for nats."""

    def __init__(self, url: str, *, name: str = "dispatch", connect_timeout: float = 2.0) -> None:
        self.url = url
        self.name = name
        self.connect_timeout = connect_timeout
        self.nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self.connected = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.disconnected.set()
        self._task: asyncio.Task[None] | None = None

    @property
    def is_connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    def jetstream(self) -> JetStreamContext:
        """The connection's one JetStream context (each context makes its own ack subscription,
        so it is made once, not per publish)."""
        assert self.nc is not None, "not connected yet"
        if self._js is None:
            self._js = self.nc.jetstream()
        return self._js

    def health(self) -> dict[str, object]:
        return {"nats": "ok" if self.is_connected else "down"}

    async def start(self) -> None:
        self._task = asyncio.create_task(self._connect(), name="dispatch-nats-connect")

    async def wait_connected(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.connected.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None
        if self.nc is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may fail; ignore
                await asyncio.wait_for(self.nc.close(), 5)
        self._down()

    def _up(self) -> None:
        self.disconnected.clear()
        self.connected.set()

    def _down(self) -> None:
        self.connected.clear()
        self.disconnected.set()

    async def _connect(self) -> None:
        delay = 0.1
        while True:
            try:
                self.nc = await nats.connect(
                    servers=[self.url],
                    name=self.name,
                    connect_timeout=self.connect_timeout,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    error_cb=self._on_error,
                    closed_cb=self._on_disconnected,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # nats-py raises several unrelated kinds; all mean "retry"
                log.warning("NATS %s unreachable (%s); retrying", self.url, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            log.info("connected to NATS %s", self.url)
            self._up()
            return

    async def _on_disconnected(self) -> None:
        if self.connected.is_set():
            log.warning("NATS connection lost; reconnecting")
        self._down()

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS %s", self.url)
        self._up()

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS error: %s", exc)
