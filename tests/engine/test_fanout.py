"""One LISTEN for the workers of `serve --workers N`: the supervisor's Fanout hears Postgres and
passes each notification on to every worker's Listener over a Unix socket, so Postgres signals
one session per NOTIFY instead of one per worker, and the workers wake as if they listened
themselves (the same notifications, and a re-check whenever the LISTEN's connection drops or a
worker reconnects)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from dispatch.notify import (
    ASSIGNED_CHANNEL,
    ASSIGNER_WAKE,
    WORK_CHANNEL,
    Fanout,
    FanoutThread,
    Listener,
)
from tests.poll import until


def listening_sessions(url: str) -> int:
    """Sessions of this database whose last statement was a LISTEN: the ones Postgres signals at
    every NOTIFY."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query ILIKE 'LISTEN %'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def notify(url: str, channel: str, payload: str = "") -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


@contextlib.asynccontextmanager
async def fanout(url: str, path: Path) -> AsyncIterator[Fanout]:
    fan, stop = Fanout(url, path), asyncio.Event()
    running = asyncio.create_task(fan.run(stop))
    try:
        yield fan
    finally:
        stop.set()
        await running


@contextlib.asynccontextmanager
async def relayed(path: Path, n: int) -> AsyncIterator[list[Listener]]:
    ears = [Listener("", relay=str(path)) for _ in range(n)]
    for ear in ears:
        await ear.start()
    try:
        yield ears
    finally:
        for ear in ears:
            await ear.stop()


async def heard(event: asyncio.Event) -> bool:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), 10)
    return event.is_set()


async def chosen(ears: list[Listener]) -> list[bool]:
    """Which workers' assigners dispatch_work wakes, once the fanout has chosen one."""

    async def flags() -> list[bool]:
        woken = [ear.wakes_assigner for ear in ears]
        return woken if any(woken) else []

    return await until(flags, "the fanout to choose an assigner")


async def test_workers_hear_every_notification_through_one_listening_session(
    db_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "notify.sock"
    async with fanout(db_url, path), relayed(path, 3) as ears:
        assert await asyncio.to_thread(listening_sessions, db_url) == 1
        # A keyed waiter (a claim waiting for what the assigner gives its agent) and a channel
        # waiter (the assigner) on every worker.
        mine = [ear.event_for(ASSIGNED_CHANNEL, "agent-7") for ear in ears]
        other = [ear.event_for(ASSIGNED_CHANNEL, "agent-8") for ear in ears]
        work = [ear.event(WORK_CHANNEL) for ear in ears]
        seen: list[list[str]] = [[] for _ in ears]
        for ear, got in zip(ears, seen, strict=True):
            ear.watch(ASSIGNED_CHANNEL, got.append)
        await asyncio.to_thread(notify, db_url, ASSIGNED_CHANNEL, "agent-7")
        await asyncio.to_thread(notify, db_url, WORK_CHANNEL)
        assert all([await heard(ev) for ev in mine + work])
        assert not any(ev.is_set() for ev in other)  # a payload wakes only its own waiters
        assert seen == [["agent-7"]] * 3
        # Each worker listening for itself: three sessions for Postgres to signal.
        async with contextlib.AsyncExitStack() as own:
            for _ in range(3):
                ear = Listener(db_url)
                await ear.start()
                own.push_async_callback(ear.stop)
            assert await asyncio.to_thread(listening_sessions, db_url) == 4


async def test_work_wakes_one_workers_assigner_and_the_next_when_that_one_goes(
    db_url: str, tmp_path: Path
) -> None:
    """Every worker's assigner woken by each new task ran one round that gave it and the others
    rounds that found it taken: the fanout wakes the assigner of the longest connected worker
    only. The others still hear dispatch_work (their dashboards refresh on it)."""
    path = tmp_path / "notify.sock"
    async with fanout(db_url, path), relayed(path, 3) as ears:
        assert await chosen(ears) == [True, False, False]
        wakes = [ear.event(ASSIGNER_WAKE) for ear in ears]
        work = [ear.event(WORK_CHANNEL) for ear in ears]
        await asyncio.to_thread(notify, db_url, WORK_CHANNEL)
        assert all([await heard(ev) for ev in work])
        assert [ev.is_set() for ev in wakes] == [True, False, False]

        # The chosen worker goes: the next one is chosen and its assigner runs a round at once
        # (a task may have come while no assigner was woken for it).
        wakes = [ear.event(ASSIGNER_WAKE) for ear in ears]
        await ears[0].stop()
        assert await heard(wakes[1])
        assert [ear.wakes_assigner for ear in ears[1:]] == [True, False]
        assert not wakes[2].is_set()


async def test_work_a_worker_announces_reaches_the_chosen_worker_alone_without_postgres(
    db_url: str, tmp_path: Path
) -> None:
    """A task a worker creates is announced through the fanout, not by NOTIFY, to the chosen
    worker alone, whose assigner it wakes, whichever worker made it; the chosen worker's own
    announcement does not leave it. The others hear nothing (an announcement only wakes an
    assigner), nor do Postgres' listeners. A line that is not an announcement cuts its worker
    off (it reconnects and re-checks, as after any reconnect)."""
    path = tmp_path / "notify.sock"
    async with fanout(db_url, path), relayed(path, 3) as ears:
        assert await chosen(ears) == [True, False, False]
        with psycopg.connect(db_url, autocommit=True) as other_replica:
            other_replica.execute("LISTEN dispatch_work")
            for announcer in (2, 0):
                wakes = [ear.event(ASSIGNER_WAKE) for ear in ears]
                work = [ear.event(WORK_CHANNEL) for ear in ears]
                ears[announcer].announce("created")
                assert await heard(wakes[0]) and await heard(work[0])
                await asyncio.sleep(0.2)  # what else the fanout sent has arrived by now
                assert [ev.is_set() for ev in wakes + work] == [True, False, False] * 2
            assert await asyncio.to_thread(lambda: list(other_replica.notifies(timeout=0.5))) == []

        # A worker may only announce work: anything else on its socket cuts it off.
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            assert await reader.readline() == b"[]\n"
            writer.write(b'["dispatch_auth", "someone"]\n')
            await asyncio.wait_for(reader.read(), 10)  # until the fanout closes it
            assert reader.at_eof()
        finally:
            writer.close()


async def test_a_lost_listen_wakes_every_worker_to_recheck_and_comes_back(
    db_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "notify.sock"
    async with fanout(db_url, path) as fan, relayed(path, 2) as ears:
        keyed = [ear.event_for(ASSIGNED_CHANNEL, "agent-7") for ear in ears]
        with psycopg.connect(db_url, autocommit=True) as conn:
            killed = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query ILIKE 'LISTEN %'"
            ).fetchall()
        assert killed == [(True,)]
        # Notifications may have been missed while it was gone: every waiter re-checks.
        assert all([await heard(ev) for ev in keyed])

        async def listening_again() -> bool:
            return fan.listener.connected.is_set() and await asyncio.to_thread(
                listening_sessions, db_url) == 1

        await until(listening_again, "the fanout to LISTEN again")
        work = [ear.event(WORK_CHANNEL) for ear in ears]
        await asyncio.to_thread(notify, db_url, WORK_CHANNEL)
        assert all([await heard(ev) for ev in work])


async def test_a_worker_reconnects_to_a_restarted_fanout(db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    async with fanout(db_url, path):
        ear = Listener("", relay=str(path))
        await ear.start()
        work = ear.event(WORK_CHANNEL)
    try:
        # Its fanout went: the worker's waiters re-check, and it tries again with backoff.
        assert await heard(work)

        async def lost() -> bool:
            return not ear.connected.is_set()

        await until(lost, "the worker to see its fanout gone")
        async with fanout(db_url, path):
            await asyncio.wait_for(ear.connected.wait(), 30)
            work = ear.event(WORK_CHANNEL)
            await asyncio.to_thread(notify, db_url, WORK_CHANNEL)
            assert await heard(work)
    finally:
        await ear.stop()


@pytest.mark.parametrize("line", [b"not json\n", b'["dispatch_work"]\n'])
async def test_a_garbled_line_makes_the_worker_reconnect(
    tmp_path: Path, line: bytes
) -> None:
    """Whatever arrives on the socket, the worker's listener re-checks and reconnects rather
    than dying (its waiters would then never wake)."""
    path = tmp_path / "notify.sock"
    served = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        served += 1
        writer.write(b"[]\n" + line)
        await reader.read()
        writer.close()

    server = await asyncio.start_unix_server(serve, path=str(path))
    ear = Listener("", relay=str(path))
    try:
        await ear.start()

        async def reconnected() -> bool:
            return served >= 2

        await until(reconnected, "the listener to reconnect", timeout=10)
    finally:
        await ear.stop()
        server.close()


def test_a_fanout_that_cannot_open_its_socket_stops_serve_from_starting(tmp_path: Path) -> None:
    """The supervisor turns this into a start-up error, rather than running workers that would
    never hear a notification."""
    fan = FanoutThread(Fanout("postgresql:///unused", tmp_path / "absent" / "notify.sock"))
    with pytest.raises(OSError, match="cannot serve notifications on"):
        fan.start()
