"""uvicorn's HTTP protocol with a deadline on reading each request: a client that opens a connection
and trickles its headers or body (or sends nothing) is disconnected when the deadline passes, so
slow clients cannot hold connections forever. Idle keep-alive connections are closed by uvicorn's
own timeout_keep_alive."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class ReadTimeoutProtocol(HttpToolsProtocol):
    read_timeout: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self._read_timer is None:
            self._read_timer = self.loop.call_later(self.read_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _too_slow(self) -> None:
        self._read_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # the first request's bytes must arrive in time too

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def protocol_class(read_timeout: float) -> type[ReadTimeoutProtocol]:
    return type("ReadTimeoutProtocol", (ReadTimeoutProtocol,), {"read_timeout": read_timeout})
