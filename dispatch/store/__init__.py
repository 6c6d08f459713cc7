"""The data layer: one SQL call per method, rows -> structs, split by role. `Store(pool)` holds
one object per role over one pool; any role's `transaction()` connection may be passed as
`conn=` to the methods of every role, so several calls make one transaction."""

from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool

from dispatch.store.agents import Agents
from dispatch.store.base import Conn
from dispatch.store.config import Config
from dispatch.store.flow import Flow
from dispatch.store.insights import Insights
from dispatch.store.outbox import Outbox
from dispatch.store.schedules import Schedules
from dispatch.store.sessions import UiSessions
from dispatch.store.tasks import Tasks

__all__ = [
    "Agents", "Config", "Conn", "Flow", "Insights", "Outbox", "Schedules", "Store", "Tasks",
    "UiSessions",
]


class Store:
    """Every role over one pool."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self.pool = pool
        self.tasks = Tasks(pool)
        self.agents = Agents(pool)
        self.flow = Flow(pool)
        self.outbox = Outbox(pool)
        self.insights = Insights(pool)
        self.config = Config(pool)
        self.ui_sessions = UiSessions(pool)
        self.schedules = Schedules(pool)
