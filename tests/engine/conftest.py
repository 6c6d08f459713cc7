"""Fixtures of the engine tests: a Listener on the test database and loopback fakes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from dispatch.notify import Listener
from tests.fakes import FakeAlexandria, FakePromptForge, FakeWarren, running


@pytest.fixture
async def listener(db_url: str) -> AsyncIterator[Listener]:
    lst = Listener(db_url)
    await lst.start()
    yield lst
    await lst.stop()


@pytest.fixture
def warren() -> Iterator[FakeWarren]:
    with running(FakeWarren()) as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture
def promptforge() -> Iterator[FakePromptForge]:
    with running(FakePromptForge()) as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture
def alexandria() -> Iterator[FakeAlexandria]:
    with running(FakeAlexandria()) as fake:
        yield fake  # type: ignore[misc]
