"""Clients of the external services: one httpx client each, with timeouts. None of
them is ever called on the assignment hot path; the directory loop and the waker use them."""

from __future__ import annotations

from typing import Any

import httpx

from dispatch.errors import DispatchError

# Connect fast, read a little slower: a slow service must not hold up a directory refresh.
DEFAULT_TIMEOUT = httpx.Timeout(5.0, connect=2.0)


class IntegrationError(Exception):
    """An external service did not answer, or answered something we cannot use."""

    def __init__(self, service: str, message: str) -> None:
        super().__init__(f"{service}: {message}")
        self.service = service
        self.message = message


async def get_json(http: httpx.AsyncClient, service: str, path: str) -> Any:
    """GET `path` and its JSON body; an HTTP error status raises httpx.HTTPStatusError."""
    r = await http.get(path)
    r.raise_for_status()
    try:
        return r.json()
    except ValueError as exc:
        raise IntegrationError(service, f"{path} did not return JSON") from exc


def describe(exc: BaseException) -> str:
    """A short reason for health reports and logs."""
    if isinstance(exc, IntegrationError | DispatchError):
        return exc.message
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
