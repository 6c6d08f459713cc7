"""Domain values: statuses, tasks, events and agents as they leave the store."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import ClassVar, Literal

import msgspec


class TaskStatus(enum.StrEnum):
    """Mirrors the Postgres enum dispatch.task_status one-to-one."""

    BLOCKED = "blocked"
    PENDING = "pending"
    ASSIGNED = "assigned"
    RUNNING = "running"
    SUSPENDED = "suspended"
    REVIEW = "review"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


TERMINAL_STATUSES = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.TIMED_OUT, TaskStatus.CANCELLED}
)


class AgentStatus(enum.StrEnum):
    """Mirrors the Postgres enum dispatch.agent_status one-to-one."""

    READY = "ready"
    SLEEPING = "sleeping"
    BUSY = "busy"
    DEGRADED = "degraded"
    STOPPED = "stopped"
    UNKNOWN = "unknown"


Approval = Literal["before_start", "review", "both"]


class Task(msgspec.Struct, frozen=True, kw_only=True):
    """A task as stored; field names are the original service's wire names."""

    task_id: uuid.UUID
    title: str
    description: str
    requester: str
    owner: str | None
    source: str
    required_capabilities: list[str]
    priority: int
    status: TaskStatus
    assigned_agent: str | None
    previous_agents: list[str]
    retry_count: int
    # The token of the current (or last) assignment, drawn at random by each one (0: never
    # assigned); a report may present it, and one naming another assignment is refused (409).
    lease: int = 0
    max_retries: int
    timeout_seconds: int
    heartbeat_seconds: int | None
    metadata: dict[str, object]
    progress: dict[str, object] | None
    result: object | None
    error: str | None
    parent_task_id: uuid.UUID | None
    idempotency_key: str | None
    available_at: datetime
    deadline_at: datetime | None
    created_at: datetime
    updated_at: datetime
    assigned_at: datetime | None
    started_at: datetime | None
    last_progress_at: datetime | None
    completed_at: datetime | None
    # Flow control: the concurrency key whose cap on assigned and running tasks it counts against,
    # and the rate key whose token bucket it takes `cost` tokens from when assigned.
    concurrency_key: str | None = None
    rate_key: str | None = None
    cost: int = 1
    # How many things it still waits for before it may run (blocked while any): the tasks it
    # depends on that have not completed, and its approval.
    waiting_on: int = 0
    # Gates: before_start (approved before it runs), review (its result accepted before it
    # completes), both; who approved it and when; a reviewer's feedback for the next attempt.
    approval: Approval | None = None
    approved_by: str | None = None
    approved_at: datetime | None = None
    feedback: str | None = None
    # Signals: what the suspended task waits for, and the payload of the signal that resumed it.
    waiting_for: str | None = None
    signal: object | None = None
    # The W3C trace context of its create ({"traceparent", "tracestate"}) when tracing was on:
    # an agent's spans for it continue that trace.
    trace_context: dict[str, str] | None = None


class TaskWithNext(Task, frozen=True, kw_only=True):
    """A completion's or failure's answer when it asked for the next tasks: the task as the
    report left it, and what the agent claimed next (possibly none)."""

    next: list[Task] = msgspec.field(default_factory=list)


OnFailure = Literal["cancel", "run"]


class Dependency(msgspec.Struct, frozen=True, kw_only=True):
    """An edge of a new task: the task it waits for, and what that task's end other than
    completion does to it (cancel it, or let it run)."""

    task_id: uuid.UUID
    on_failure: OnFailure = "cancel"


class DependencyState(msgspec.Struct, frozen=True, kw_only=True):
    """One dependency as its dependent reads it: the edge and what the dependency gave."""

    task_id: uuid.UUID
    title: str
    status: TaskStatus
    on_failure: OnFailure
    # It has let the dependent run (completed, or ended and on_failure is run).
    satisfied: bool
    result: object | None
    error: str | None
    completed_at: datetime | None


class Dependencies(msgspec.Struct, frozen=True, kw_only=True):
    """GET /api/v1/tasks/{id}/dependencies: what the task waits for, with their results, and the
    tasks that wait for it."""

    task_id: uuid.UUID
    status: TaskStatus
    waiting_on: int
    dependencies: list[DependencyState]
    dependents: list[uuid.UUID]


class NewTask(msgspec.Struct, frozen=True, kw_only=True):
    """What a requester asks for; unset fields take the database defaults."""

    title: str
    description: str = ""
    owner: str | None = None
    required_capabilities: list[str] = msgspec.field(default_factory=list)
    priority: int = 0
    timeout_seconds: int | None = None
    heartbeat_seconds: int | None = None
    max_retries: int = 3
    metadata: dict[str, object] = msgspec.field(default_factory=dict)
    parent_task_id: uuid.UUID | None = None
    available_at: datetime | None = None
    source: str = "api"
    concurrency_key: str | None = None
    rate_key: str | None = None
    cost: int = 1
    depends_on: list[Dependency] = msgspec.field(default_factory=list)
    approval: Approval | None = None


# A change to one task, as one value: the broker applies any of them the same way (fenced on the
# task, counted under `event`) and the store maps each to its SQL function. `lease`, where a
# report may present it, is the assignment the reporter holds; any other is refused (409).


class Start(msgspec.Struct, frozen=True, kw_only=True):
    event: ClassVar[str] = "started"
    task_id: uuid.UUID
    agent_id: str
    lease: int | None = None


class Progress(msgspec.Struct, frozen=True, kw_only=True):
    event: ClassVar[str] = "progress"
    task_id: uuid.UUID
    agent_id: str
    percent: float | None = None
    message: str | None = None
    data: object = None
    lease: int | None = None


class Complete(msgspec.Struct, frozen=True, kw_only=True):
    event: ClassVar[str] = "completed"
    task_id: uuid.UUID
    actor: str
    result: object = None
    admin: bool = False
    lease: int | None = None


class Fail(msgspec.Struct, frozen=True, kw_only=True):
    event: ClassVar[str] = "failed"
    task_id: uuid.UUID
    agent_id: str
    error: str | None = None
    retry_eligible: bool = True
    lease: int | None = None


class Cancel(msgspec.Struct, frozen=True, kw_only=True):
    event: ClassVar[str] = "cancelled"
    task_id: uuid.UUID
    actor: str
    reason: str | None = None
    admin: bool = False


class Update(msgspec.Struct, frozen=True, kw_only=True):
    """A merge patch of the task's metadata and/or a new priority."""

    event: ClassVar[str] = "updated"
    task_id: uuid.UUID
    actor: str
    metadata_patch: dict[str, object] | None = None
    priority: int | None = None
    admin: bool = False


class Requeue(msgspec.Struct, frozen=True, kw_only=True):
    event: ClassVar[str] = "requeued"
    task_id: uuid.UUID
    actor: str


class Release(msgspec.Struct, frozen=True, kw_only=True):
    """The assigned agent gives its task back unfinished (pending again, no attempt counted)."""

    event: ClassVar[str] = "released"
    task_id: uuid.UUID
    agent_id: str
    reason: str | None = None
    lease: int | None = None


class Depend(msgspec.Struct, frozen=True, kw_only=True):
    """A waiting task's requester (or an admin) makes it depend on another task too."""

    event: ClassVar[str] = "dependency_added"
    task_id: uuid.UUID
    depends_on: uuid.UUID
    actor: str
    on_failure: OnFailure = "cancel"
    admin: bool = False
    # Who must be able to see the dependency (None: anyone may).
    viewer: str | None = None


class Undepend(msgspec.Struct, frozen=True, kw_only=True):
    event: ClassVar[str] = "dependency_removed"
    task_id: uuid.UUID
    depends_on: uuid.UUID
    actor: str
    admin: bool = False


class Approve(msgspec.Struct, frozen=True, kw_only=True):
    """A task waiting for approval may run (its requester, its owner or an admin)."""

    event: ClassVar[str] = "approved"
    task_id: uuid.UUID
    actor: str
    admin: bool = False


class Reject(msgspec.Struct, frozen=True, kw_only=True):
    """A task waiting for approval is cancelled, with the reason."""

    event: ClassVar[str] = "rejected"
    task_id: uuid.UUID
    actor: str
    reason: str | None = None
    admin: bool = False


class Accept(msgspec.Struct, frozen=True, kw_only=True):
    """The result in review stands: the task completes."""

    event: ClassVar[str] = "accepted"
    task_id: uuid.UUID
    actor: str
    admin: bool = False


class RequestChanges(msgspec.Struct, frozen=True, kw_only=True):
    """The result in review does not stand: another attempt, with the feedback on the task."""

    event: ClassVar[str] = "changes_requested"
    task_id: uuid.UUID
    actor: str
    feedback: str
    admin: bool = False


class Suspend(msgspec.Struct, frozen=True, kw_only=True):
    """The agent sets its running task aside until a signal comes (its slot is free meanwhile);
    no signal within timeout_seconds fails the attempt."""

    event: ClassVar[str] = "suspended"
    task_id: uuid.UUID
    agent_id: str
    waiting_for: str
    timeout_seconds: int
    lease: int | None = None


class Signal(msgspec.Struct, frozen=True, kw_only=True):
    """What a suspended task waits for has come: the payload goes on the task, which resumes."""

    event: ClassVar[str] = "signalled"
    task_id: uuid.UUID
    actor: str
    payload: object = None
    admin: bool = False


Change = (
    Start | Progress | Complete | Fail | Cancel | Update | Requeue | Release | Depend | Undepend
    | Approve | Reject | Accept | RequestChanges | Suspend | Signal
)


class NextClaim(msgspec.Struct, frozen=True, kw_only=True):
    """What an agent's completion or failure claims for it next, as a claim would."""

    max_tasks: int = 1
    start: bool = False
    wait_seconds: float = 0


class ReportOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """One report of a batch: the HTTP status its single call would give, and the task after it
    (on 409, the task as it is now) or the error (and the field it names, on 400)."""

    task_id: uuid.UUID | None
    status: int
    task: Task | None = None
    error: str | None = None
    field: str | None = None


class ReportOutcomeWithNext(ReportOutcome, frozen=True, kw_only=True):
    """The outcome of the batch's report that asked for the next tasks: what was claimed."""

    next: list[Task] = msgspec.field(default_factory=list)


class TaskEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One row of the event log (history and outbox)."""

    id: int
    task_id: uuid.UUID
    event: str
    actor: str
    payload: dict[str, object]
    created_at: datetime
    published_at: datetime | None


class Agent(msgspec.Struct, frozen=True, kw_only=True):
    """An entry of the directory, with its effective concurrency limit."""

    agent_id: str
    capabilities: list[str]
    owner: str | None
    status: AgentStatus
    policy: str | None
    max_concurrent: int
    active_tasks: int
    drained: bool
    source: str
    last_assigned_at: datetime | None
    last_seen_at: datetime
    updated_at: datetime


class Assignment(msgspec.Struct, frozen=True, kw_only=True):
    """One task given to one agent by the assigner; `waited` is the seconds the task waited to be
    assigned (since it was created, or became available for a scheduled or retried task)."""

    task_id: uuid.UUID
    agent_id: str
    score: float
    wake: bool
    waited: float
    # What the task requires (the assignment wait is measured by capability).
    capabilities: list[str] = msgspec.field(default_factory=list)
    # The task's trace context (tracing): the assignment's span continues its trace.
    trace_context: dict[str, str] | None = None
    # Whether another round now may give more (dispatch.task_assign's `more`).
    more: bool = False


class Expiry(msgspec.Struct, frozen=True, kw_only=True):
    """One attempt ended by the reaper: `event` is timeout or reassigned."""

    task_id: uuid.UUID
    event: str
    status: TaskStatus


class TaskFilter(msgspec.Struct, frozen=True, kw_only=True):
    """Filters of the task listing; None means no filter."""

    statuses: list[TaskStatus] | None = None
    requester: str | None = None
    owner: str | None = None
    assignee: str | None = None
    capability: str | None = None
    source: str | None = None
    parent_task_id: uuid.UUID | None = None
    # Only the tasks this caller is involved in (auth.mode tokens; deps.task_visible).
    visible_to: str | None = None
    # The dashboard's search: a title substring (any case), a prefix of the id's text, and a
    # metadata document the task's contains (metadata @> it).
    title: str | None = None
    id_prefix: str | None = None
    metadata: dict[str, object] | None = None


class Cursor(msgspec.Struct, frozen=True, array_like=True):
    """Position after the last row of a page, in listing order."""

    priority: int
    created_at: datetime
    task_id: uuid.UUID


class PendingBy(msgspec.Struct, frozen=True, kw_only=True):
    """The pending queue of one capability or tenant (`other`: the rest, past the largest 20)."""

    key: str
    pending: int
    # Available now (the others are scheduled for later), and the longest one of them has waited.
    ready: int
    oldest_wait_seconds: float
    # By capability: the agents not stopped nor drained that have it (None for `other`).
    agents: int | None = None


class Stats(msgspec.Struct, frozen=True, kw_only=True):
    """Queue statistics for GET /api/v1/stats; the total_* keys are the original service's names
    (in_progress is running; failed counts failed and timed_out, both failure ends)."""

    queue: dict[str, int]
    oldest_pending_seconds: float | None
    avg_completion_ms: float | None
    wait_ms_p50: float | None
    wait_ms_p95: float | None
    completed_last_hour: int
    failed_last_hour: int
    dead_letter: int
    total_pending: int
    total_in_progress: int
    total_completed: int
    total_failed: int
    # The pending queue by capability (a task requiring several counts under each; `(any)`: no
    # capability required), and by tenant while flow control is on (else None).
    by_capability: list[PendingBy] = msgspec.field(default_factory=list)
    by_tenant: list[PendingBy] | None = None


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    """One agent considered for a task, with the factors of its score or why it was excluded."""

    agent_id: str
    eligible: bool
    score: float
    capability_match: float
    availability: float
    priority_weight: float
    active_tasks: int
    max_concurrent: int
    status: AgentStatus
    drained: bool
    owner: str | None
    previous_agent: bool
    reasons: list[str]
    # The agent holding the task (assigned or running): judged without the task in its load.
    holder: bool = False


class Holder(msgspec.Struct, frozen=True, kw_only=True):
    """Who holds an assigned or running task, since when, and how it came to: `claimed` (the
    agent asked for work and took it) or `assigned` (the assigner chose it, with `score`)."""

    agent_id: str
    since: datetime | None
    attempt: int
    lease: int | None
    how: str
    score: float | None = None


class Explanation(msgspec.Struct, frozen=True, kw_only=True):
    """GET /api/v1/tasks/{id}/explain: every agent of the directory, eligible ones best first
    (the first is whom the assigner would choose now), then the excluded ones with reasons."""

    task_id: uuid.UUID
    status: TaskStatus
    owner_filter_enabled: bool
    owner: str | None
    # False when the task has no owner (any eligible agent may take it) or the filter is off.
    owner_scoped: bool
    notes: list[str]
    candidates: list[Candidate]
    # Flow control: whose fair share the task counts in, its priority after aging (while
    # pending), and every rule holding it back now (rate key, concurrency key, fair share).
    tenant: str | None = None
    effective_priority: int | None = None
    held_back: list[str] = msgspec.field(default_factory=list)
    # An assigned or running task's holder (null otherwise).
    holder: Holder | None = None


class ConcurrencyLimit(msgspec.Struct, frozen=True, kw_only=True):
    """A concurrency key's cap and the tasks of the key assigned or running now."""

    key: str
    max_active: int
    active_tasks: int
    updated_at: datetime


class RateLimit(msgspec.Struct, frozen=True, kw_only=True):
    """A rate key's token bucket, with the tokens it holds now."""

    key: str
    capacity: float
    refill_per_second: float
    tokens: float
    updated_at: datetime


class TenantWeight(msgspec.Struct, frozen=True, kw_only=True):
    """A tenant's fair-share weight; `default` when none was set (weight 1)."""

    tenant: str
    weight: float
    default: bool = False


class Schedule(msgspec.Struct, frozen=True, kw_only=True):
    """Recurring work: a task made from `template` at every fire of `cron` in `timezone`.
    `next_fire_at` is None while a scheduler has yet to compute it (new, changed or resumed)."""

    name: str
    cron: str
    timezone: str
    template: dict[str, object]
    overlap: str
    catch_up: str
    catch_up_limit: int
    paused: bool
    next_fire_at: datetime | None
    last_fire_at: datetime | None
    last_task_id: uuid.UUID | None
    fired_count: int
    skipped_count: int
    missed_count: int
    last_error: str | None
    created_at: datetime
    updated_at: datetime
