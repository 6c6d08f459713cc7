"""Use cases of the broker: submit, claim, report, cancel, requeue, the directory. Owns connections
and transactions; the SQL functions decide what may happen."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import msgspec
from psycopg_pool import AsyncConnectionPool

from dispatch import db, store
from dispatch.errors import Conflict, NotFound
from dispatch.metrics import Metrics
from dispatch.models import (
    TERMINAL_STATUSES,
    Agent,
    AgentStatus,
    Assignment,
    Candidate,
    Cursor,
    Expiry,
    Explanation,
    NewTask,
    Stats,
    Task,
    TaskEvent,
    TaskFilter,
    TaskStatus,
)
from dispatch.notify import WORK_CHANNEL, Listener
from dispatch.settings import AssignmentSettings


class Broker:
    """The lifecycle over a connection pool. `now` parameters exist for tests (an injected clock);
    production passes None and the database's clock decides."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        *,
        listener: Listener | None = None,
        assignment: AssignmentSettings | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.pool = pool
        self.listener = listener
        self.assignment = assignment or AssignmentSettings()
        self.metrics = metrics

    async def apply_config(self) -> None:
        """Write this process's assignment settings where the SQL functions read them."""
        async with db.connection(self.pool) as conn:
            await store.config_apply(conn, self.assignment)

    # -- requesters ------------------------------------------------------------------------------

    async def submit(
        self, new: NewTask, *, requester: str, idempotency_key: str | None = None
    ) -> tuple[Task, bool]:
        """Create a task; returns (task, created). A repeated idempotency key returns the first."""
        async with db.connection(self.pool) as conn:
            task, created = await store.task_create(
                conn, new, requester=requester, idempotency_key=idempotency_key
            )
        if created and self.metrics is not None:
            self.metrics.tasks_created.labels(task.source).inc()
            self.metrics.task_transitions.labels("created").inc()
        return task, created

    async def get(self, task_id: uuid.UUID) -> Task:
        async with db.connection(self.pool) as conn:
            task = await store.task_get(conn, task_id)
        if task is None:
            raise NotFound(f"task {task_id} not found")
        return task

    async def list(
        self, filters: TaskFilter, *, limit: int = 50, after: Cursor | None = None
    ) -> builtins.list[Task]:
        async with db.connection(self.pool) as conn:
            return await store.task_list(conn, filters, limit=limit, after=after)

    async def events(self, task_id: uuid.UUID) -> builtins.list[TaskEvent]:
        async with db.connection(self.pool) as conn:
            events = await store.task_events(conn, task_id)
            if not events and await store.task_get(conn, task_id) is None:
                raise NotFound(f"task {task_id} not found")
        return events

    async def update(
        self,
        task_id: uuid.UUID,
        actor: str,
        *,
        metadata_patch: dict[str, object] | None = None,
        priority: int | None = None,
        admin: bool = False,
        now: datetime | None = None,
    ) -> Task:
        async with db.connection(self.pool) as conn:
            return await self._fenced(
                conn,
                task_id,
                store.task_update(
                    conn,
                    task_id,
                    actor,
                    metadata_patch=metadata_patch,
                    priority=priority,
                    admin=admin,
                    now=now,
                ),
                "updated",
            )

    async def cancel(
        self,
        task_id: uuid.UUID,
        actor: str,
        reason: str | None = None,
        *,
        admin: bool = False,
        now: datetime | None = None,
    ) -> Task:
        async with db.connection(self.pool) as conn:
            return await self._fenced(
                conn,
                task_id,
                store.task_cancel(conn, task_id, actor, reason, admin=admin, now=now),
                "cancelled",
            )

    async def requeue(self, task_id: uuid.UUID, actor: str, now: datetime | None = None) -> Task:
        async with db.connection(self.pool) as conn:
            return await self._fenced(
                conn, task_id, store.task_requeue(conn, task_id, actor, now), "requeued"
            )

    # -- agents reporting ------------------------------------------------------------------------

    async def claim(
        self,
        agent_id: str,
        capabilities: Sequence[str] | None = None,
        *,
        wait_seconds: float = 0,
        now: datetime | None = None,
    ) -> Task | None:
        """Pull mode: the best task this agent may take, waiting up to wait_seconds for one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        while True:
            woken = self.listener.event(WORK_CHANNEL) if self.listener else None
            async with db.connection(self.pool) as conn:
                task = await store.task_claim(conn, agent_id, capabilities, now)
            remaining = deadline - loop.time()
            if task is not None and self.metrics is not None:
                self.metrics.task_transitions.labels("assigned").inc()
            if task is not None or remaining <= 0:
                return task
            if woken is None:
                await asyncio.sleep(min(remaining, 0.5))
                continue
            try:
                await asyncio.wait_for(woken.wait(), remaining)
            except TimeoutError:
                return None

    async def start(self, task_id: uuid.UUID, agent_id: str, now: datetime | None = None) -> Task:
        async with db.connection(self.pool) as conn:
            return await self._fenced(
                conn, task_id, store.task_start(conn, task_id, agent_id, now), "started"
            )

    async def progress(
        self,
        task_id: uuid.UUID,
        agent_id: str,
        *,
        percent: float | None = None,
        message: str | None = None,
        data: object = None,
        now: datetime | None = None,
    ) -> Task:
        async with db.connection(self.pool) as conn:
            return await self._fenced(
                conn,
                task_id,
                store.task_progress(
                    conn, task_id, agent_id, percent=percent, message=message, data=data, now=now
                ),
                "progress",
            )

    async def complete(
        self,
        task_id: uuid.UUID,
        actor: str,
        result: object = None,
        *,
        admin: bool = False,
        now: datetime | None = None,
    ) -> Task:
        async with db.connection(self.pool) as conn:
            return await self._fenced(
                conn,
                task_id,
                store.task_complete(conn, task_id, actor, result, admin=admin, now=now),
                "completed",
            )

    async def fail(
        self,
        task_id: uuid.UUID,
        agent_id: str,
        error: str | None = None,
        *,
        retry_eligible: bool = True,
        now: datetime | None = None,
    ) -> Task:
        async with db.connection(self.pool) as conn:
            return await self._fenced(
                conn,
                task_id,
                store.task_fail(conn, task_id, agent_id, error, retry_eligible, now),
                "failed",
            )

    async def _fenced(
        self, conn: store.Conn, task_id: uuid.UUID, change: Any, event: str | None = None
    ) -> Task:
        """Run a transition; a conflict carries the task's current state for the 409 body."""
        try:
            task: Task = await change
        except Conflict as exc:
            exc.task = await store.task_get(conn, task_id)
            raise
        if event is not None:
            self._count(event, task)
        return task

    def _count(self, event: str, task: Task) -> None:
        """task_transitions_total{event} (with the retry or dlq that follows a failure) and,
        for an attempt that ended the task, task_run_seconds{status}."""
        if self.metrics is None:
            return
        self.metrics.task_transitions.labels(event).inc()
        if event == "failed":
            retried = task.status == TaskStatus.PENDING
            self.metrics.task_transitions.labels("retry" if retried else "dlq").inc()
        if (
            event in {"completed", "failed", "cancelled"}
            and task.status in TERMINAL_STATUSES
            and task.assigned_at is not None
            and task.completed_at is not None
        ):
            seconds = (task.completed_at - task.assigned_at).total_seconds()
            self.metrics.task_run.labels(str(task.status)).observe(max(seconds, 0.0))

    def _count_expiries(self, expiries: Sequence[Expiry]) -> None:
        if self.metrics is None:
            return
        for expiry in expiries:
            self.metrics.task_transitions.labels(expiry.event).inc()
            if expiry.event == "timeout":
                retried = expiry.status == TaskStatus.PENDING
                self.metrics.task_transitions.labels("retry" if retried else "dlq").inc()

    # -- the engine's SQL calls ------------------------------------------------------------------

    async def assign(
        self, *, batch: int | None = None, now: datetime | None = None
    ) -> builtins.list[Assignment]:
        """One assignment batch (SKIP LOCKED); empty when nothing is assignable."""
        async with db.connection(self.pool) as conn:
            assignments = await store.task_assign(conn, batch or self.assignment.batch_size, now)
        if assignments and self.metrics is not None:
            self.metrics.task_transitions.labels("assigned").inc(len(assignments))
        return assignments

    async def expire(
        self, *, now: datetime | None = None, limit: int = 100
    ) -> builtins.list[Expiry]:
        async with db.connection(self.pool) as conn:
            expiries = await store.task_expire(conn, now, limit)
        self._count_expiries(expiries)
        return expiries

    async def report_unmatched(self, *, now: datetime | None = None, limit: int = 100) -> int:
        async with db.connection(self.pool) as conn:
            return await store.task_report_unmatched(conn, now, limit)

    async def next_due(self, now: datetime | None = None) -> datetime | None:
        async with db.connection(self.pool) as conn:
            return await store.next_due(conn, now)

    async def prune(self, before: datetime, limit: int = 1000) -> int:
        async with db.connection(self.pool) as conn:
            return await store.task_prune(conn, before, limit)

    # -- the directory ---------------------------------------------------------------------------

    async def agent_register(
        self,
        agent_id: str,
        *,
        capabilities: Sequence[str] | None = None,
        owner: str | None = None,
        max_concurrent: int | None = None,
        status: AgentStatus | None = None,
        policy: str | None = None,
        source: str = "registry",
        now: datetime | None = None,
    ) -> Agent:
        async with db.connection(self.pool) as conn:
            return await store.agent_upsert(
                conn,
                agent_id,
                capabilities=capabilities,
                owner=owner,
                max_concurrent=max_concurrent,
                status=status,
                policy=policy,
                source=source,
                now=now,
            )

    async def agent_heartbeat(
        self, agent_id: str, status: AgentStatus | None = None, now: datetime | None = None
    ) -> Agent:
        async with db.connection(self.pool) as conn:
            return await store.agent_heartbeat(conn, agent_id, status, now)

    async def agent_drain(self, agent_id: str, drained: bool = True) -> Agent:
        async with db.connection(self.pool) as conn:
            return await store.agent_drain(conn, agent_id, drained, None)

    async def agent_stop(self, agent_id: str, now: datetime | None = None) -> int:
        """The agent stopped: its active tasks go back to pending. Returns how many."""
        async with db.connection(self.pool) as conn:
            return await store.agent_stop(conn, agent_id, now)

    async def agent(self, agent_id: str) -> Agent:
        async with db.connection(self.pool) as conn:
            agent = await store.agent_get(conn, agent_id)
        if agent is None:
            raise NotFound(f"agent {agent_id} not found")
        return agent

    async def agents(self) -> builtins.list[Agent]:
        async with db.connection(self.pool) as conn:
            return await store.agent_list(conn)

    async def explain(self, task_id: uuid.UUID) -> Explanation:
        """Every candidate agent for the task with its score factors or exclusion reasons."""
        async with db.connection(self.pool) as conn:
            task = await store.task_get(conn, task_id)
            if task is None:
                raise NotFound(f"task {task_id} not found")
            rows = await store.task_explain(conn, task_id)
            config = await store.config_get(conn)
        filter_on = bool(config["owner_filter_enabled"])
        if task.owner is None:
            notes = ["the task has no owner: it is not owner-scoped, any eligible agent may run it"]
        elif not filter_on:
            notes = [f"the owner filter is off: agents of any owner may run {task.owner}'s task"]
        else:
            notes = [f"owner-scoped: only agents that belong to {task.owner} may run it"]
        return Explanation(
            task_id=task.task_id,
            status=task.status,
            owner_filter_enabled=filter_on,
            owner=task.owner,
            owner_scoped=filter_on and task.owner is not None,
            notes=notes,
            candidates=[msgspec.convert(dict(r), Candidate) for r in rows],
        )

    async def stats(self, now: datetime | None = None) -> Stats:
        async with db.connection(self.pool) as conn:
            return await store.stats(conn, now)

    # -- the assignment engine's loops -----------------------------------------------------------

    async def assign_timed(
        self, *, batch: int | None = None, now: datetime | None = None
    ) -> builtins.list[tuple[Assignment, float]]:
        """One assignment batch; each with the seconds its task waited to be assigned."""
        async with db.connection(self.pool) as conn:
            timed = await store.task_assign_timed(conn, batch or self.assignment.batch_size, now)
        if timed and self.metrics is not None:
            self.metrics.task_transitions.labels("assigned").inc(len(timed))
        return timed

    async def seconds_until_due(self) -> float | None:
        """Seconds until the next deadline or scheduled task (by the database's clock)."""
        async with db.connection(self.pool) as conn:
            return await store.seconds_until_due(conn)

    async def directory_sync(
        self,
        entries: Sequence[Mapping[str, object]],
        owners: Sequence[Mapping[str, str]] | None = None,
        *,
        now: datetime | None = None,
    ) -> None:
        """Write one refresh of the external directory (and, when given, device ownership) in one
        transaction."""
        async with db.connection(self.pool) as conn, conn.transaction():
            if entries:
                await store.agent_sync(conn, entries, now)
            if owners is not None:
                await store.agent_owners_sync(conn, owners, "alexandria", now)

    async def directory_mark_stale(self, stale_ms: int, *, now: datetime | None = None) -> int:
        """Agents not refreshed for stale_ms become unknown; returns how many."""
        async with db.connection(self.pool) as conn:
            return await store.agent_mark_stale(conn, stale_ms, now)

    @contextlib.asynccontextmanager
    async def exclusive(self, key: int) -> AsyncIterator[bool]:
        """Hold the advisory lock `key` for the block if no other replica holds it; yields whether
        it was taken (the block should do nothing when it was not)."""
        async with db.connection(self.pool) as conn:
            taken = await store.advisory_try_lock(conn, key)
            try:
                yield taken
            finally:
                if taken:
                    await store.advisory_unlock(conn, key)
