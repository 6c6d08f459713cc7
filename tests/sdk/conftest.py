"""A real `dispatch serve` for the SDK and CLI tests; retries without waiting out a backoff."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from dispatch.sdk.client import DispatchClient
from tests.serve import ServeProcess, serving

T = TypeVar("T")

SERVE_ENV = {"DISPATCH_RETRY_BACKOFF_MS": "0"}


@pytest.fixture
def sp(db_url: str, tmp_path: Path) -> Iterator[ServeProcess]:
    with serving(db_url, tmp_path, env=SERVE_ENV) as process:
        yield process


@pytest.fixture
def admin(sp: ServeProcess) -> Iterator[DispatchClient]:
    with DispatchClient(sp.api, "ops", admin_token=sp.admin_token) as client:
        yield client


def eventually(probe: Callable[[], T], ok: Callable[[T], bool], timeout: float = 30,
               what: str = "condition") -> T:
    """Poll probe() until ok(value); fail with the last value after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout}s; last: {value!r}")
        time.sleep(0.05)
