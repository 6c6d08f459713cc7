"""Reads that may lag a little, on a read replica (database.read_url): the dashboard, stats, the
metrics' queue gauges and explain. Never the lifecycle: every write and every read a write
depends on stays on the primary.

`ReadRoute` is pool-shaped (what `db.connection` takes), so the Store's roles read through it
unchanged: each checkout goes to the replica while the `ReplicaMonitor` finds it answering, in
recovery and within database.read_max_lag_ms of the primary, and to the primary otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from dispatch import db
from dispatch.errors import DispatchError
from dispatch.loop import BackgroundLoop

log = logging.getLogger(__name__)

# How often the monitor measures the replica's lag, and how long one measure may take.
CHECK_SECONDS = 1.0
CHECK_TIMEOUT_SECONDS = 2.0
# How long a dashboard read waits for the replica to replay what the primary has committed
# (caught_up) before it reads the primary instead; and how often it looks meanwhile.
CATCH_UP_SECONDS = 0.25
CATCH_UP_POLL_SECONDS = 0.005

# Set for a block whose reads must not lag and that the replica could not serve in time.
_primary_only: ContextVar[bool] = ContextVar("dispatch_primary_only", default=False)

# The replica's replay position against the primary's write position (sent as a parameter):
# bytes still to replay, and how old the last replayed commit is (the lag in time while bytes
# remain; a replica that has replayed everything is 0 behind, however idle the primary).
_REPLICA_LAG = """
SELECT pg_is_in_recovery() AS standby,
       pg_wal_lsn_diff(%s::pg_lsn, pg_last_wal_replay_lsn())::float8 AS behind_bytes,
       (extract(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000)::float8 AS age_ms
"""


async def _primary_lsn(primary: AsyncConnectionPool[Any], timeout: float) -> str:
    """The primary's WAL write position now."""
    async with db.connection(primary, timeout=timeout) as conn:
        cur = await conn.execute("SELECT pg_current_wal_lsn()::text AS lsn")
        row = await cur.fetchone()
    assert row is not None
    return str(row["lsn"])


class ReadRoute:
    """The pool reads go to: the replica's while `use_replica`, else the primary's. Shaped like
    the pool for `db.connection`: getconn, putconn, timeout."""

    def __init__(
        self, primary: AsyncConnectionPool[Any], replica: AsyncConnectionPool[Any]
    ) -> None:
        self.primary = primary
        self.replica = replica
        self.use_replica = False
        self._lent: dict[int, AsyncConnectionPool[Any]] = {}

    @property
    def timeout(self) -> float:
        return self.primary.timeout

    async def getconn(self, timeout: float | None = None) -> psycopg.AsyncConnection[Any]:
        pool = self.replica if self.use_replica and not _primary_only.get() else self.primary
        conn = await pool.getconn(timeout=timeout)
        self._lent[id(conn)] = pool
        return conn

    async def putconn(self, conn: psycopg.AsyncConnection[Any]) -> None:
        pool = self._lent.pop(id(conn), self.primary)
        if pool is self.replica and (conn.broken or conn.closed):
            # The replica went away under a read: the next reads go to the primary at once,
            # not after the monitor's next round (which turns them back when it answers).
            self.use_replica = False
        await pool.putconn(conn)

    @contextlib.asynccontextmanager
    async def caught_up(self, timeout: float = CATCH_UP_SECONDS) -> AsyncIterator[None]:
        """For the block, reads see at least what the primary had committed when it began: on the
        replica once it has replayed that far (waiting up to `timeout`), else on the primary. For
        the dashboard, which refreshes when the primary notifies a change and would otherwise
        read the replica a moment before it has that change."""
        token = None
        if self.use_replica and not await self._replayed(timeout):
            token = _primary_only.set(True)
        try:
            yield
        finally:
            if token is not None:
                _primary_only.reset(token)

    async def _replayed(self, timeout: float) -> bool:
        """Whether the replica replays, within `timeout`, up to the primary's WAL position now."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            lsn = await _primary_lsn(self.primary, timeout)
            async with db.connection(self.replica, timeout=timeout) as conn:
                while True:
                    cur = await conn.execute(
                        "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn AS ok", (lsn,)
                    )
                    done = await cur.fetchone()
                    if done is not None and done["ok"]:
                        return True
                    if loop.time() >= deadline:
                        return False
                    await asyncio.sleep(CATCH_UP_POLL_SECONDS)
        except (DispatchError, psycopg.Error):
            return False


class ReplicaMonitor(BackgroundLoop):
    """Every second: the primary's WAL position, then the replica's lag behind it; switches the
    route. /health reports it as `replica` (it never makes /health fail: reads fall back)."""

    name = "replica"

    def __init__(self, route: ReadRoute, *, max_lag_ms: int) -> None:
        super().__init__(interval=CHECK_SECONDS)
        self.route = route
        self.max_lag_ms = max_lag_ms
        self.state = "starting"
        self.lag_ms: float | None = None

    async def run_once(self) -> None:
        try:
            lsn = await _primary_lsn(self.route.primary, CHECK_TIMEOUT_SECONDS)
            async with db.connection(self.route.replica, timeout=CHECK_TIMEOUT_SECONDS) as conn:
                cur = await conn.execute(_REPLICA_LAG, (lsn,))
                lag = await cur.fetchone()
            assert lag is not None
        except (DispatchError, psycopg.Error) as exc:
            self._set("down", None, str(exc))
            return
        if not lag["standby"]:
            self._set("not a standby", None, "database.read_url is not in recovery")
        elif lag["behind_bytes"] is None:
            self._set("down", None, "the replica has replayed nothing yet")
        else:
            age = lag["age_ms"]
            ms = 0.0 if lag["behind_bytes"] <= 0 else max(0.0, age if age is not None else 1e12)
            self._set("ok" if ms <= self.max_lag_ms else "behind", ms, None)

    def _set(self, state: str, lag_ms: float | None, why: str | None) -> None:
        use = state == "ok"
        if use != self.route.use_replica or state != self.state:
            level = logging.INFO if use else logging.WARNING
            log.log(level, "read replica %s%s; reads go to the %s", state,
                    f" ({why})" if why else "" if lag_ms is None else f" (lag {lag_ms:.0f} ms)",
                    "replica" if use else "primary")
        self.route.use_replica = use
        self.state = state
        self.lag_ms = lag_ms

    def status(self) -> dict[str, object]:
        """What /health and the dashboard show."""
        return {
            "status": self.state,
            "lag_ms": None if self.lag_ms is None else round(self.lag_ms),
            "max_lag_ms": self.max_lag_ms,
            "reads": "replica" if self.route.use_replica else "primary",
        }

    def health(self) -> dict[str, object]:
        return {"replica": self.status()}

    async def stop(self) -> None:
        await super().stop()
        self.route.use_replica = False
