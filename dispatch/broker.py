"""The one door to the data for the API, NATS, the dashboard and the loops. The broker decides
what the data layer does not: the claim's long poll, a conflict's details for the 409, the
transition metrics, the assignment settings check, explain. Every change to a task is one call,
`apply(change)`; plain reads and writes of a role go to that role of the data layer, which the
broker holds as `tasks`, `agents`, `flow`, `outbox`, `insights`, `config` and `schedules`;
a schedule's create, update and resume are the broker's (they try the template and set the next
fire)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import msgspec

from dispatch.cron import Cron
from dispatch.errors import Conflict, Forbidden, InvalidInput, NotFound
from dispatch.metrics import Metrics
from dispatch.models import (
    TERMINAL_STATUSES,
    Assignment,
    Candidate,
    Change,
    Complete,
    Expiry,
    Explanation,
    Fail,
    Holder,
    NewTask,
    NextClaim,
    ReportOutcome,
    ReportOutcomeWithNext,
    Schedule,
    Task,
    TaskStatus,
)
from dispatch.notify import ASSIGNED_CHANNEL, CREATED, WORK_CHANNEL, Listener, first_set
from dispatch.replica import ReadRoute
from dispatch.settings import AssignmentSettings
from dispatch.store import Conn, Store
from dispatch.store.tasks import Claimed
from dispatch.tracing import NOOP

if TYPE_CHECKING:
    from dispatch.tracing import Tracing

log = logging.getLogger(__name__)

# The requester of every task a schedule fires is `schedule:<name>` (dispatch.schedule_fire).
SCHEDULE_REQUESTER = "schedule:"

# What wakes an agent's waiting claim (Broker._claim_wakers).
Wakers = tuple[asyncio.Event, ...]

# A batched report's action -> the event its single call counts.
# The statuses in which a task has a holder (explain names it).
HELD = (TaskStatus.ASSIGNED, TaskStatus.RUNNING)
_REPORT_EVENTS = {"start": "started", "progress": "progress", "complete": "completed",
                  "fail": "failed"}


class Broker:
    """The lifecycle over a Store. `now` parameters exist for tests (an injected clock);
    production passes None and the database's clock decides."""

    def __init__(
        self,
        store: Store,
        *,
        listener: Listener | None = None,
        assignment: AssignmentSettings | None = None,
        metrics: Metrics | None = None,
        reads: Store | None = None,
        replica: Callable[[], dict[str, object]] | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        # Reads that may lag (the dashboard, stats, gauges, explain): on the read replica when
        # there is one (dispatch.replica), else the same store. `replica()` says how it stands.
        self.store = store
        self.reads = reads if reads is not None else store
        self.replica = replica
        self.tasks = store.tasks
        self.agents = store.agents
        self.flow = store.flow
        self.outbox = store.outbox
        self.insights = store.insights
        self.config = store.config
        self.ui_sessions = store.ui_sessions
        self.schedules = store.schedules
        self.listener = listener
        self.assignment = assignment or AssignmentSettings()
        self.metrics = metrics
        # Spans of the transitions and assignments (None: tracing is off, the default).
        self.tracing = tracing
        # Set when the process shuts down: waiting claims answer at once (with nothing), so the
        # HTTP server is not held open by long polls for their whole wait.
        self.closing = asyncio.Event()
        # Set when this process runs the assigner (every `serve` does). A new task then goes to an
        # agent with room by the assigner's push, which wakes that agent's waiting claim; other
        # waiting claims are not woken by it, so a create costs one claim, not one per idle agent.
        self.pushing = False
        # Set while this process's assigner runs (Listener.announce): the work this process makes
        # itself (a task it creates, a slot a report frees and its claim leaves empty) wakes an
        # assigner of this `serve` without a NOTIFY dispatch_work, which would cost the listener
        # of every replica a transaction of its own. Called after the commit with the NOTIFY's
        # payload.
        self.announce: Callable[[str], None] | None = None

    async def apply_config(self) -> None:
        """Write this process's assignment settings where the SQL functions read them. Replicas
        share that one row, so settings that differ from the ones there (written by another
        replica, or by an earlier start) are logged as a warning naming the keys, then replaced."""
        differing = await self.config.apply(self.assignment)
        if differing:
            log.warning(
                "dispatch.config holds other assignment settings than this replica's "
                "(replicas should share them); replacing: %s",
                ", ".join(f"assignment.{k}" for k in differing),
                extra={"keys": differing},
            )

    # -- requesters ------------------------------------------------------------------------------

    async def submit(
        self, new: NewTask, *, requester: str, idempotency_key: str | None = None,
        viewer: str | None = None, trace_parent: Mapping[str, str] | None = None,
    ) -> tuple[Task, bool]:
        """Create a task; returns (task, created). A repeated idempotency key returns the first.
        The tasks it depends on must be visible to `viewer` (None: any task). While tracing is
        on, the task keeps the trace context of its create span, the child of `trace_parent` (a
        message's headers) or else of the current span."""
        if requester.startswith(SCHEDULE_REQUESTER):
            # A fire's task is found by its requester and idempotency key (fire:<time>): a client
            # creating under that name could make a fire's task ahead of it.
            raise Forbidden(
                f"requester ids starting with {SCHEDULE_REQUESTER} are the scheduler's own (the"
                " tasks a schedule fires); create the task under another agent id"
            )
        creating = NOOP if self.tracing is None else self.tracing.creating(trace_parent)
        announce = self.announce
        with creating as trace_context:
            task, created = await self.tasks.create(
                new, requester=requester, idempotency_key=idempotency_key, viewer=viewer,
                trace_context=trace_context, announce=announce is None,
            )
        if created and announce is not None:
            announce(CREATED)
        if created and self.metrics is not None:
            self.metrics.tasks_created.labels(task.source).inc()
            self.metrics.task_transitions.labels("created").inc()
        return task, created

    async def apply(self, *changes: Change, now: datetime | None = None) -> Task:
        """Apply changes to one task in one transaction (PATCH cancels and merge-patches at once,
        so a refused part undoes the rest); returns the task after the last. A conflict or
        refusal carries the task's current state (the 409 body, the visibility rule)."""
        if not changes:
            raise InvalidInput("nothing to change: give status, metadata or priority")
        if len(changes) == 1:
            return await self._fenced(changes[0], self.tasks.apply(changes[0], now=now))

        async def all_of() -> Task:
            async with self.tasks.transaction() as conn:
                for change in changes:
                    task = await self.tasks.apply(change, now=now, conn=conn)
            return task

        return await self._fenced(changes[0], all_of())

    async def apply_each(
        self, changes: Sequence[Change], *, batch: int = 100
    ) -> tuple[int, list[tuple[uuid.UUID, str]]]:
        """Apply changes each to its own task (the dashboard's bulk requeue and cancel), `batch`
        of them to a transaction. A change its task refuses now (it moved on since it was
        selected) is undone alone, in its savepoint, and reported; returns (applied, [(task id,
        why not)])."""
        applied: list[tuple[Change, Task]] = []
        skipped: list[tuple[uuid.UUID, str]] = []
        for i in range(0, len(changes), batch):
            done: list[tuple[Change, Task]] = []
            async with self.tasks.transaction() as conn:
                for change in changes[i:i + batch]:
                    try:
                        async with conn.transaction():
                            done.append((change, await self.tasks.apply(change, conn=conn)))
                    except (Conflict, Forbidden, NotFound, InvalidInput) as exc:
                        skipped.append((change.task_id, exc.message))
            applied += done  # counted once their transaction committed
            for change, task in done:
                self._count(change.event, task)
        return len(applied), skipped

    async def apply_then_claim(
        self, change: Change, agent_id: str, then: NextClaim, *, now: datetime | None = None
    ) -> tuple[Task, list[Task]]:
        """A report and the agent's claim of its next tasks in one transaction (one statement),
        so a busy agent makes one request per task for both. The claim runs in a subtransaction:
        should it fail, the report still stands (with no next task). When nothing was there to
        claim and the agent will wait, the wait happens after the commit, as a claim's long
        poll."""
        claimed: list[Task] = []
        error: str | None = None
        start = time.time_ns()
        woken = self._claim_wakers(agent_id) if then.wait_seconds > 0 else None
        # A completion or failure frees its slot; the claim after it takes a task into it or
        # leaves it to be announced (dispatch.task_claim_next).
        announce = self.announce if isinstance(change, Complete | Fail) else None

        async def both() -> Task:
            nonlocal claimed, error
            task, claimed, error = await self.tasks.apply_then_claim(
                change, agent_id, max_tasks=then.max_tasks, start=then.start,
                announce=announce is None, now=now,
            )
            if announce is not None and not claimed:
                announce("")
            return task

        task = await self._fenced(change, both())
        return task, await self._after_claim(agent_id, then, claimed, error, now, start, woken)

    async def _after_claim(
        self, agent_id: str, then: NextClaim, claimed: list[Task], error: str | None,
        now: datetime | None, start_ns: int, woken: Wakers | None,
    ) -> list[Task]:
        """What a report's claim of the agent's next tasks gave (logged when it failed, counted);
        when it gave nothing and the agent will wait, the wait, after the commit, as a claim's
        long poll. `woken`: the wake-ups taken before the report's statement, which has just
        looked, so the wait begins without looking again."""
        if error is not None:
            log.info("the claim after the report of %s failed: %s", agent_id, error)
        self._count_claimed(claimed, then.start)
        if claimed and self.tracing is not None:
            self._trace_claimed(claimed, then.start, start_ns)
        if not claimed and then.wait_seconds > 0:
            claimed = await self.claim_many(
                agent_id, max_tasks=then.max_tasks, start=then.start,
                wait_seconds=then.wait_seconds, now=now,
                looked=woken if error is None else None,
            )
        return claimed

    async def _fenced(self, change: Change, run: Awaitable[Task]) -> Task:
        """Run a change; a conflict or refusal carries the task's current state."""
        start = time.time_ns()
        try:
            task = await run
        except (Conflict, Forbidden, NotFound) as exc:
            # The task as it is now: a conflict's answer, and whether the caller may learn that it
            # exists. Looked up for an unknown id too, so that a refusal about a task the caller
            # may not see and one about an id that does not exist take the same path (auth.mode
            # tokens answers both 404; their timing must not tell them apart).
            exc.task = (await self.tasks.by_id([change.task_id])).get(change.task_id)
            raise
        self._count(change.event, task)
        if self.tracing is not None:
            self.tracing.transitions(change.event, [task], start)
        return task

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
        tasks = await self.claim_many(agent_id, capabilities, wait_seconds=wait_seconds, now=now)
        return tasks[0] if tasks else None

    def _claim_wakers(self, agent_id: str) -> Wakers | None:
        """What wakes an agent's waiting claim: a task the assigner gives it, and any new work
        when no assigner runs here to push it. Taken before the claim's statement, so that what
        is committed after the statement's snapshot still wakes the wait. None without a
        listener."""
        if self.listener is None:
            return None
        return (self.listener.event_for(ASSIGNED_CHANNEL, agent_id),
                *(() if self.pushing else (self.listener.event(WORK_CHANNEL),)))

    async def claim_many(
        self,
        agent_id: str,
        capabilities: Sequence[str] | None = None,
        *,
        max_tasks: int = 1,
        start: bool = False,
        wait_seconds: float = 0,
        idempotency_key: str | None = None,
        now: datetime | None = None,
        looked: Wakers | None = None,
    ) -> list[Task]:
        """Up to max_tasks of the best tasks this agent may take (started too with `start`),
        waiting up to wait_seconds for the first; a long poll woken by NOTIFY. A claim sent again
        with its idempotency key returns what the first one took. `looked`: a statement that
        found nothing for this agent has just run (a report's claim of its next tasks), with
        these wake-ups taken before it; the wait begins at once, without looking again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        if looked is not None and not await first_set([*looked, self.closing], wait_seconds):
            return []
        while True:
            woken = self._claim_wakers(agent_id)
            began = time.time_ns()
            tasks = await self.tasks.claim(
                agent_id, capabilities, max_tasks=max_tasks, start=start, key=idempotency_key,
                now=now,
            )
            remaining = deadline - loop.time()
            self._count_claimed(tasks, start)
            if tasks and self.tracing is not None:
                self._trace_claimed(tasks, start, began)
            if tasks or remaining <= 0 or self.closing.is_set():
                return tasks
            if woken is None:  # no listener: look again every half second
                await first_set([self.closing], min(remaining, 0.5))
                continue
            if not await first_set([*woken, self.closing], remaining):
                return []

    async def report(
        self,
        agent_id: str,
        reports: Sequence[Mapping[str, object]],
        *,
        admin: bool = False,
        then: tuple[int, NextClaim] | None = None,
        now: datetime | None = None,
    ) -> list[ReportOutcome]:
        """Several reports of one agent in one transaction, each fenced on its own. `then`:
        after the report at that index, if it was applied, the agent's claim of its next tasks
        in the same statement (in a subtransaction, as apply_then_claim), carried by its
        outcome."""
        claimed: list[Task] = []
        error: str | None = None
        start = time.time_ns()
        woken = None
        if then is None:
            outcomes = await self.tasks.report_batch(agent_id, reports, admin=admin, now=now)
        else:
            woken = self._claim_wakers(agent_id) if then[1].wait_seconds > 0 else None
            outcomes, claimed, error = await self.tasks.report_batch_then_claim(
                agent_id, reports, then[0], max_tasks=then[1].max_tasks, start=then[1].start,
                admin=admin, now=now,
            )
        for report, outcome in zip(reports, outcomes, strict=True):
            if outcome.status == 200 and outcome.task is not None:
                self._count(_REPORT_EVENTS[str(report["action"])], outcome.task)
                if self.tracing is not None:
                    self.tracing.transitions(
                        _REPORT_EVENTS[str(report["action"])], [outcome.task], start
                    )
        if then is None or outcomes[then[0]].status != 200:
            return outcomes
        index, claim = then
        claimed = await self._after_claim(agent_id, claim, claimed, error, now, start, woken)
        outcomes[index] = ReportOutcomeWithNext(
            **msgspec.structs.asdict(outcomes[index]), next=claimed
        )
        return outcomes

    def _count_claimed(self, tasks: Sequence[Task], started: bool) -> None:
        if tasks and self.metrics is not None:
            # The agent's own tasks among them were counted when the assigner gave them.
            assigned = tasks.assigned if isinstance(tasks, Claimed) else len(tasks)
            self.metrics.task_transitions.labels("assigned").inc(assigned)
            for task in tasks[len(tasks) - assigned:]:  # the new ones come after its own
                if task.assigned_at is not None:
                    since = max(task.created_at, task.available_at)
                    waited = (task.assigned_at - since).total_seconds()
                    self.metrics.waited(task.required_capabilities, max(waited, 0.0))
            if started:
                self.metrics.task_transitions.labels("started").inc(len(tasks))

    def _trace_claimed(self, tasks: Sequence[Task], started: bool, start_ns: int) -> None:
        """The spans of a claim: an assignment for each task it assigned, a start for each it
        started."""
        assert self.tracing is not None
        assigned = tasks.assigned if isinstance(tasks, Claimed) else len(tasks)
        self.tracing.transitions("assigned", tasks[len(tasks) - assigned:], start_ns)
        if started:
            self.tracing.transitions("started", tasks, start_ns)

    def _count(self, event: str, task: Task) -> None:
        """task_transitions_total{event} (with the retry or dlq that follows a failure) and,
        for an attempt that ended the task, task_run_seconds{status}."""
        if self.metrics is None:
            return
        if event == "completed" and task.status == TaskStatus.REVIEW:
            event = "in_review"  # the result waits for a reviewer; accepted, it completes
        self.metrics.task_transitions.labels(event).inc()
        if event == "accepted":
            self.metrics.task_transitions.labels("completed").inc()
        elif event == "approved" and task.status == TaskStatus.PENDING:
            self.metrics.task_transitions.labels("unblocked").inc()
        elif event == "failed" or (
            event == "changes_requested" and task.status in (TaskStatus.PENDING, TaskStatus.FAILED)
        ):
            # request-changes ends the attempt as a failure does: a retry, or the end.
            retried = task.status == TaskStatus.PENDING
            self.metrics.task_transitions.labels("retry" if retried else "dlq").inc()
        if (
            event in {"completed", "failed", "cancelled", "accepted", "changes_requested"}
            and task.status in TERMINAL_STATUSES
            and task.assigned_at is not None
            and task.completed_at is not None
        ):
            seconds = (task.completed_at - task.assigned_at).total_seconds()
            self.metrics.task_run.labels(str(task.status)).observe(max(seconds, 0.0))

    # -- the engine ------------------------------------------------------------------------------

    async def assign(
        self, *, batch: int | None = None, now: datetime | None = None
    ) -> list[Assignment]:
        """One assignment batch (SKIP LOCKED); empty when nothing is assignable."""
        start = time.time_ns()
        assignments = await self.tasks.assign(batch or self.assignment.batch_size, now=now)
        return self._assigned(assignments, start)

    async def assign_round(
        self, *, batch: int | None = None, now: datetime | None = None
    ) -> tuple[list[Assignment], float | None, bool, bool]:
        """One assignment batch, with the seconds until a deferred task becomes available (None:
        none waits), whether every agent was full with work waiting and whether a pick was lost
        to a claim holding its agent's slot (see Tasks.assign_round)."""
        start = time.time_ns()
        assignments, due, full, lost = await self.tasks.assign_round(
            batch or self.assignment.batch_size, now=now)
        return self._assigned(assignments, start), due, full, lost

    def _assigned(self, assignments: list[Assignment], start: int) -> list[Assignment]:
        if assignments and self.tracing is not None:
            self.tracing.assigned(assignments, start)
        if assignments and self.metrics is not None:
            self.metrics.task_transitions.labels("assigned").inc(len(assignments))
        return assignments

    async def expire(self, *, now: datetime | None = None, limit: int = 100) -> list[Expiry]:
        """End the overdue attempts (deadline, heartbeat, wake timeout)."""
        expiries = await self.tasks.expire(now=now, limit=limit)
        if self.metrics is not None:
            for expiry in expiries:
                self.metrics.task_transitions.labels(expiry.event).inc()
                if expiry.event == "timeout":
                    retried = expiry.status == TaskStatus.PENDING
                    self.metrics.task_transitions.labels("retry" if retried else "dlq").inc()
        return expiries

    def fresh_reads(self) -> contextlib.AbstractAsyncContextManager[None]:
        """A block whose reads (self.reads) see what the primary has committed by its start: on a
        read replica once it has replayed that far, or on the primary (dispatch.replica)."""
        route = self.reads.pool
        return route.caught_up() if isinstance(route, ReadRoute) else contextlib.nullcontext()

    async def explain(self, task_id: uuid.UUID) -> Explanation:
        """Every candidate agent for the task with its score factors or exclusion reasons (read
        where reads may lag; from the primary when the replica has not the task yet)."""
        try:
            return await self._explain(self.reads, task_id)
        except NotFound:
            if self.reads is self.store:
                raise
            return await self._explain(self.store, task_id)

    async def _explain(self, reads: Store, task_id: uuid.UUID) -> Explanation:
        async with reads.tasks.transaction() as conn:
            task = await reads.tasks.get(task_id, conn=conn)
            rows = await reads.tasks.explain(task_id, conn=conn)
            hold = await reads.tasks.hold(task_id, conn=conn)
            config = await reads.config.get(conn=conn)
            held = task.assigned_agent is not None and task.status in HELD
            given = await reads.tasks.last_assignment(task_id, conn=conn) if held else None
        filter_on = bool(config["owner_filter_enabled"])
        if task.owner is None:
            notes = ["the task has no owner: it is not owner-scoped, any eligible agent may run it"]
        elif not filter_on:
            notes = [f"the owner filter is off: agents of any owner may run {task.owner}'s task"]
        else:
            notes = [f"owner-scoped: only agents that belong to {task.owner} may run it"]
        holder = None
        if held and task.assigned_agent is not None:
            payload = given["payload"] if given is not None else {}
            claimed = given is not None and given["actor"] == task.assigned_agent
            score = payload.get("score")
            holder = Holder(
                agent_id=task.assigned_agent, since=task.assigned_at,
                attempt=task.retry_count + 1, lease=task.lease,
                how="claimed" if claimed else "assigned",
                score=float(score) if isinstance(score, int | float) else None,
            )
            if claimed:
                notes.append(f"{task.assigned_agent} holds it: it asked for work and took it "
                             f"(attempt {holder.attempt})")
            else:
                notes.append(
                    f"{task.assigned_agent} holds it: the assigner chose it as the best eligible "
                    "agent" + (f", with score {holder.score:.3f}" if holder.score is not None
                               else "") + f" (attempt {holder.attempt})")
        return Explanation(
            task_id=task.task_id,
            status=task.status,
            owner_filter_enabled=filter_on,
            owner=task.owner,
            owner_scoped=filter_on and task.owner is not None,
            notes=notes,
            candidates=[msgspec.convert(dict(r), Candidate) for r in rows],
            tenant=hold["tenant"],
            effective_priority=hold["effective_priority"],
            held_back=list(hold["reasons"]),
            holder=holder,
        )

    # schedules: a write is one transaction that leaves the schedule ready to fire

    async def schedule_create(self, name: str, fields: dict[str, object]) -> Schedule:
        """A new schedule (Conflict when the name is taken), its template tried and its next
        fire set."""
        Cron(str(fields["cron"]), str(fields.get("timezone", "UTC")))
        async with self.schedules.transaction() as conn:
            row = await self.schedules.create(name, fields, conn=conn)
            if row is None:
                raise Conflict(f"schedule {name} exists already (PATCH it to change it)")
            return await self._schedule_settle(row, conn)

    async def schedule_update(self, name: str, fields: dict[str, object]) -> Schedule:
        """Change the fields given; a new timing applies from now on."""
        async with self.schedules.transaction() as conn:
            current = await self._schedule(name, conn)
            Cron(str(fields.get("cron", current.cron)),
                 str(fields.get("timezone", current.timezone)))
            row = await self.schedules.update(name, fields, conn=conn)
            if row is None:
                raise _schedule_gone(name)
            return await self._schedule_settle(row, conn)

    async def schedule_resume(self, name: str) -> Schedule:
        """Resume: it fires from now on. Refused (InvalidInput) while its expression or zone
        does not read, as the scheduler would pause it again."""
        async with self.schedules.transaction() as conn:
            current = await self._schedule(name, conn)
            Cron(current.cron, current.timezone)
            return await self._schedule_settle(
                await self.schedules.resume(name, conn=conn), conn
            )

    async def _schedule(self, name: str, conn: Conn) -> Schedule:
        found = await self.schedules.get(name, conn=conn)
        if found is None:
            raise _schedule_gone(name)
        return found

    async def _schedule_settle(self, row: Schedule, conn: Conn) -> Schedule:
        """Try the template (a task the create would refuse is InvalidInput naming
        template.<field>) and set the next fire of an active schedule that has none, by the
        database's clock."""
        try:
            await self.schedules.try_template(row.name, {"template": row.template}, conn=conn)
        except InvalidInput as exc:
            field = f"template.{exc.field}" if exc.field else "template"
            raise InvalidInput(f"{field}: {exc}", field=field) from None
        if row.paused or row.next_fire_at is not None:
            return row
        now = await self.schedules.now(conn=conn)
        await self.schedules.set_next(row.name, Cron(row.cron, row.timezone).next_after(now),
                                      conn=conn)
        return await self._schedule(row.name, conn)


def _schedule_gone(name: str) -> NotFound:
    return NotFound(f"schedule {name} does not exist")
