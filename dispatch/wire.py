"""What REST and NATS share on the way in: the request structs with their constraints (each written
once here), the error body, and the rules that turn a request in the original service's vocabulary
(with its aliases) into domain values; also the task list's cursor and status filter, which the API
and the dashboard both parse. Imports no web framework, so the events package and the client use
it too.

No `from __future__ import annotations`: Litestar reads these annotations at runtime.
"""

import base64
import binascii
import re
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, NamedTuple

import msgspec

from dispatch.errors import InvalidInput
from dispatch.models import (
    AgentStatus,
    Approval,
    Cursor,
    Dependency,
    NewTask,
    OnFailure,
    Task,
    TaskStatus,
)

# PostgreSQL text cannot hold NUL; rejecting it here keeps it a 400 instead of a driver error.
NO_NUL = r"^[^\x00]*$"
AGENT_ID_PATTERN = r"^[A-Za-z0-9._:@/-]{1,128}$"
# The pattern, and no /-separated segment `.` or `..` (dispatch.agent_id_valid): clients put ids in
# URL paths, where such a segment names another resource; \Z, unlike $, refuses a final newline.
AGENT_ID_RE = re.compile(r"^(?!(?:[^/]*/)*\.\.?(?:/|\Z))[A-Za-z0-9._:@/-]{1,128}\Z")

Text = Annotated[str, msgspec.Meta(pattern=NO_NUL)]
ShortText = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=NO_NUL)]
Title = Annotated[str, msgspec.Meta(min_length=1, max_length=500, pattern=NO_NUL)]
Description = Annotated[str, msgspec.Meta(max_length=65536, pattern=NO_NUL)]
LongText = Annotated[str, msgspec.Meta(max_length=65536, pattern=NO_NUL)]
Capability = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=NO_NUL)]
Capabilities = Annotated[list[Capability], msgspec.Meta(max_length=64)]
Priority = Annotated[int, msgspec.Meta(ge=0, le=10)]
Seconds = Annotated[int, msgspec.Meta(ge=1, le=2_147_483_647)]
MaxRetries = Annotated[int, msgspec.Meta(ge=0, le=100)]
MaxConcurrent = Annotated[int, msgspec.Meta(ge=1, le=1000)]
Percent = Annotated[float, msgspec.Meta(ge=0, le=100)]
WaitSeconds = Annotated[float, msgspec.Meta(ge=0, le=30)]
MaxTasks = Annotated[int, msgspec.Meta(ge=1, le=100)]
Source = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=NO_NUL)]
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]
# The token of the assignment a report belongs to (the task's `lease`: random, compared only for
# equality).
Lease = Annotated[int, msgspec.Meta(ge=1, le=2_147_483_647)]
# Every timestamp a client sends must lie here (dispatch.time_in_range says the same in SQL).
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 1, 1, tzinfo=UTC)
Cost = Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)]
MaxActive = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
# The flow-control bounds, as the SQL checks them (docs/flow-control.md derives them): an empty
# bucket fills within RATE_WAIT_MAX seconds (refill_per_second >= capacity / RATE_WAIT_MAX,
# checked by rate_bucket), so no wait a bucket announces leaves the range of a timestamp.
RATE_WAIT_MAX = 1e9  # dispatch.rate_wait_max(), about 31.7 years
Capacity = Annotated[float, msgspec.Meta(ge=1, le=1e12)]
Refill = Annotated[float, msgspec.Meta(ge=1 / RATE_WAIT_MAX, le=1e12)]
Weight = Annotated[float, msgspec.Meta(ge=0.001, le=1000)]
JsonObject = dict[str, Any]
# How long Dispatch's own HTTP clients (the SDK, serve's supervisor asking its workers) keep an idle
# connection for reuse: well under server.keep_alive_ms (5 s by default). A client that keeps one
# as long as the server does sends, now and then, a request on a connection the server closes at
# that moment, and gets "server disconnected" for it, more often the busier the server.
CLIENT_IDLE_SECONDS = 2.0


class _Body(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Request bodies reject unknown fields."""


class DependencyBody(_Body):
    """An item of depends_on given as an object: the task, and what its failure does."""

    task_id: uuid.UUID
    on_failure: OnFailure = "cancel"


# The tasks a new task waits for: ids, or {task_id, on_failure} objects (on_failure cancel when
# given as an id).
DependsOn = Annotated[list[uuid.UUID | DependencyBody], msgspec.Meta(max_length=1000)]


class SuspendReport(_Body):
    """POST /api/v1/tasks/{id}/suspend: what the task waits for, and for how long at most."""

    waiting_for: Annotated[str, msgspec.Meta(min_length=1, max_length=65536, pattern=NO_NUL)]
    timeout_seconds: Annotated[int, msgspec.Meta(ge=1, le=31_536_000)]
    lease: Lease | None = None


class SignalBody(_Body):
    """POST /api/v1/tasks/{id}/signal: the payload the suspended task resumes with."""

    payload: Any = None


class DecisionBody(_Body):
    """POST /api/v1/tasks/{id}/approve, /reject, /accept: the reason (reject's, recorded)."""

    reason: LongText | None = None


class ChangesBody(_Body):
    """POST /api/v1/tasks/{id}/request-changes: what to change, for the next attempt."""

    feedback: Annotated[str, msgspec.Meta(min_length=1, max_length=65536, pattern=NO_NUL)]


class DependBody(_Body):
    """PUT /api/v1/tasks/{id}/dependencies/{dependency_id}."""

    on_failure: OnFailure = "cancel"


class TaskCreate(_Body, omit_defaults=True):
    """POST /api/v1/tasks (the client sends it without defaults). `scope` is the original
    service's single capability, `context` its name for metadata."""

    title: Title
    description: Description = ""
    owner: ShortText | None = None
    required_capabilities: Capabilities | None = None
    scope: Capability | None = None
    priority: Priority = 0
    timeout_seconds: Seconds | None = None
    heartbeat_seconds: Seconds | None = None
    max_retries: MaxRetries = 3
    metadata: JsonObject | None = None
    context: JsonObject | None = None
    parent_task_id: uuid.UUID | None = None
    available_at: AwareDatetime | None = None
    source: Source = "api"
    concurrency_key: ShortText | None = None
    rate_key: ShortText | None = None
    cost: Cost = 1
    depends_on: DependsOn | None = None
    approval: Approval | None = None


class TaskPatch(_Body):
    """PATCH /api/v1/tasks/{id}: cancel, merge-patch the metadata, or re-prioritise."""

    status: Literal["cancelled"] | None = None
    reason: LongText | None = None
    metadata: JsonObject | None = None
    context: JsonObject | None = None
    priority: Priority | None = None


class ClaimRequest(_Body):
    """POST /api/v1/tasks/claim: None capabilities means the agent's registered ones. With
    max_tasks the answer is an array of up to that many; with start they are started too."""

    capabilities: Capabilities | None = None
    wait_seconds: WaitSeconds = 0
    max_tasks: MaxTasks | None = None
    start: bool = False


class StartReport(_Body):
    lease: Lease | None = None


class ProgressReport(_Body):
    """Ours: percent, message, data. The original service's: progress (a fraction up to 1, else a
    percentage) and detail (a string is the message, anything else the data). `lease`, in every
    report, names the assignment it belongs to: a stale one is refused."""

    percent: Percent | None = None
    message: LongText | None = None
    data: Any = None
    progress: Percent | None = None
    detail: Any = None
    lease: Lease | None = None


class NextRequest(_Body):
    """`next` in a completion or failure: claim the agent's next tasks in the same request and
    transaction, as POST /tasks/claim with these fields would (with its registered
    capabilities); the answer then carries them as `next`."""

    max_tasks: MaxTasks = 1
    start: bool = False
    wait_seconds: WaitSeconds = 0


class CompleteReport(_Body):
    result: Any = None
    lease: Lease | None = None
    next: NextRequest | None = None


class FailReport(_Body):
    error: LongText | None = None
    retry_eligible: bool = True
    lease: Lease | None = None
    next: NextRequest | None = None


class ReleaseReport(_Body):
    """POST /tasks/{id}/release: why the agent gives its task back unfinished."""

    reason: LongText | None = None
    lease: Lease | None = None


class ReportItem(_Body):
    """One report of POST /api/v1/tasks/reports: the task, the action, and that action's body
    (the fields of POST /tasks/{id}/start, /progress, /complete or /fail)."""

    task_id: uuid.UUID
    action: Literal["start", "progress", "complete", "fail"]
    lease: Lease | None = None
    percent: Percent | None = None
    message: LongText | None = None
    data: Any = None
    progress: Percent | None = None
    detail: Any = None
    result: Any = None
    error: LongText | None = None
    retry_eligible: bool | None = None
    # On one complete or fail of the batch: claim the agent's next tasks after the batch, in its
    # transaction; that report's outcome carries them.
    next: NextRequest | None = None


MAX_REPORTS = 100
Reports = Annotated[list[ReportItem], msgspec.Meta(min_length=1, max_length=MAX_REPORTS)]

# The fields each action's body may carry.
_REPORT_FIELDS = {
    "start": set(),
    "progress": {"percent", "message", "data", "progress", "detail"},
    "complete": {"result"},
    "fail": {"error", "retry_eligible"},
}
_OPTIONAL_REPORT_FIELDS = (
    "percent", "message", "data", "progress", "detail", "result", "error", "retry_eligible"
)


def report_body(item: ReportItem) -> dict[str, object]:
    """The SQL function's form of one report; InvalidInput for a field of another action."""
    for name in _OPTIONAL_REPORT_FIELDS:
        if getattr(item, name) is not None and name not in _REPORT_FIELDS[item.action]:
            raise InvalidInput(f"{name} is not a field of a {item.action} report", field=name)
    if item.next is not None and item.action not in ("complete", "fail"):
        raise InvalidInput("next goes with a complete or fail report", field="next")
    body: dict[str, object] = {"task_id": str(item.task_id), "action": item.action}
    if item.lease is not None:
        body["lease"] = item.lease
    if item.action == "progress":
        fields = progress_fields(item.percent, item.message, item.data, item.progress, item.detail)
        body |= {"percent": fields.percent, "message": fields.message, "data": fields.data}
    elif item.action == "complete":
        body["result"] = item.result
    elif item.action == "fail":
        body["error"] = item.error
        body["retry_eligible"] = True if item.retry_eligible is None else item.retry_eligible
    return body


class AgentRegistration(_Body):
    """PUT /api/v1/agents/{id}: unset fields keep their current value."""

    capabilities: Capabilities | None = None
    owner: ShortText | None = None
    max_concurrent: MaxConcurrent | None = None
    status: AgentStatus | None = None


class Heartbeat(_Body):
    status: AgentStatus | None = None


class ErrorBody(msgspec.Struct, kw_only=True):
    """Every failure: a message, and a detail (the field, or the task's current state on 409)."""

    error: str
    detail: Any = None


_AT_PATH = re.compile(r" - at `\$\.?([^`]*)`$")


def error_path(message: str) -> str | None:
    """The field a msgspec validation message names (`... - at `$.a.b``), if any."""
    at_path = _AT_PATH.search(message)
    return at_path.group(1) if at_path else None


def one_of(first: object, second: object, names: tuple[str, str]) -> None:
    """A field and its alias may not both be given."""
    if first is not None and second is not None:
        raise InvalidInput(f"give {names[0]} or {names[1]}, not both", field=names[1])


class ProgressFields(NamedTuple):
    percent: float | None
    message: str | None
    data: object


def progress_fields(
    percent: float | None, message: str | None, data: object, progress: float | None, detail: object
) -> ProgressFields:
    """A progress report in either shape: ours (percent, message, data) or the original service's
    (progress, detail): progress <= 1 is a fraction, above that a percentage; a string detail is
    the message, any other detail the data. Mixing the two names for one thing is refused."""
    if progress is not None:
        one_of(percent, progress, ("percent", "progress"))
        # Scaled as the decimal it was written as: 0.07 is 7, not 7.000000000000001.
        percent = float(Decimal(repr(progress)) * 100) if progress <= 1 else progress
    if detail is not None:
        if isinstance(detail, str):
            one_of(message, detail, ("message", "detail"))
            if len(detail) > 65536 or "\x00" in detail:
                raise InvalidInput("detail: a message of at most 64 KiB, no NUL", field="detail")
            message = detail
        else:
            one_of(data, detail, ("data", "detail"))
            data = detail
    return ProgressFields(percent, message, data)


def encode_cursor(task: Task) -> str:
    """The opaque cursor of the page that follows `task` in list order."""
    cursor = Cursor(priority=task.priority, created_at=task.created_at, task_id=task.task_id)
    return base64.urlsafe_b64encode(msgspec.json.encode(cursor)).decode().rstrip("=")


def decode_cursor(raw: str) -> Cursor:
    """A cursor encode_cursor issued; InvalidInput for anything else."""
    try:
        data = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        return msgspec.json.decode(data, type=Cursor)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise InvalidInput("cursor is not one this server issued", field="cursor") from None


# The original service's names for our statuses.
STATUS_ALIASES = {"in_progress": TaskStatus.RUNNING}


def parse_statuses(raw: str) -> list[TaskStatus]:
    """A comma list of statuses (with the original service's aliases); InvalidInput naming them."""
    statuses = []
    for part in raw.split(","):
        name = part.strip().lower()
        if name in STATUS_ALIASES:
            statuses.append(STATUS_ALIASES[name])
            continue
        try:
            statuses.append(TaskStatus(name))
        except ValueError:
            allowed = ", ".join([*(s.value for s in TaskStatus), *STATUS_ALIASES])
            raise InvalidInput(
                f"status {name[:32]!r} is not one of {allowed}", field="status"
            ) from None
    return statuses


def check_time(value: datetime | None, field: str) -> None:
    """A timestamp outside EARLIEST..LATEST is refused before anything is written."""
    if value is not None and not EARLIEST <= value < LATEST:
        raise InvalidInput(
            f"{field} must be from 1970-01-01 to before 9999-01-01 (UTC)", field=field
        )


def new_task(req: TaskCreate) -> NewTask:
    """The NewTask a create request asks for; InvalidInput when a field and its alias clash."""
    one_of(req.required_capabilities, req.scope, ("required_capabilities", "scope"))
    check_time(req.available_at, "available_at")
    one_of(req.metadata, req.context, ("metadata", "context"))
    fields = msgspec.structs.asdict(req)
    if req.required_capabilities is None:
        fields["required_capabilities"] = [req.scope] if req.scope is not None else []
    if req.metadata is None:
        fields["metadata"] = req.context or {}
    fields["depends_on"] = [
        Dependency(task_id=d) if isinstance(d, uuid.UUID)
        else Dependency(task_id=d.task_id, on_failure=d.on_failure)
        for d in req.depends_on or ()
    ]
    # NewTask's fields are TaskCreate's, without the aliases and what a subclass adds.
    return NewTask(**{name: fields[name] for name in NewTask.__struct_fields__})


class ConcurrencyLimitBody(_Body):
    """PUT /api/v1/limits/concurrency/{key}: at most max_active tasks of the key assigned or
    running at once (0 pauses the key)."""

    max_active: MaxActive


class RateLimitBody(_Body):
    """PUT /api/v1/limits/rate/{key}: a token bucket of `capacity` tokens that gains
    refill_per_second tokens a second (60 per minute: capacity 60, refill_per_second 1)."""

    capacity: Capacity
    refill_per_second: Refill


def rate_bucket(body: RateLimitBody) -> tuple[float, float]:
    """The bucket's capacity and refill; InvalidInput when an empty one would take longer than
    RATE_WAIT_MAX seconds to fill."""
    if body.capacity > body.refill_per_second * RATE_WAIT_MAX:
        raise InvalidInput(
            f"refill_per_second must be at least capacity / {RATE_WAIT_MAX:g}"
            f" ({body.capacity / RATE_WAIT_MAX:g}), so that an empty bucket fills within"
            f" {RATE_WAIT_MAX:g} s (about 31.7 years)", field="refill_per_second")
    return body.capacity, body.refill_per_second


class TenantWeightBody(_Body):
    """PUT /api/v1/tenants/{tenant}/weight: the tenant's share of assignments against others
    waiting at the same priority (default 1)."""

    weight: Weight


def flow_key(raw: str, field: str) -> str:
    """A concurrency key, rate key or tenant from a path: 1 to 256 characters, no NUL."""
    if not 1 <= len(raw) <= 256 or "\x00" in raw:
        raise InvalidInput(f"{field} must be 1 to 256 characters, no NUL", field=field)
    return raw


ScheduleName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,128}$")]
CronText = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=NO_NUL)]
ZoneName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=NO_NUL)]
Overlap = Literal["skip", "allow"]
CatchUp = Literal["none", "latest", "all"]
CatchUpLimit = Annotated[int, msgspec.Meta(ge=1, le=10_000)]
_NAMED_FIELD = re.compile(r"(?:missing required|contains unknown) field `([^`]+)`")


class ScheduleCreate(_Body):
    """POST /api/v1/schedules: `template` is the body of a task create (without available_at)."""

    name: ScheduleName
    cron: CronText
    template: JsonObject
    timezone: ZoneName = "UTC"
    overlap: Overlap = "skip"
    catch_up: CatchUp = "latest"
    catch_up_limit: CatchUpLimit = 100
    paused: bool = False


class SchedulePatch(_Body):
    """PATCH /api/v1/schedules/{name}: the fields given replace the schedule's."""

    cron: CronText | None = None
    timezone: ZoneName | None = None
    template: JsonObject | None = None
    overlap: Overlap | None = None
    catch_up: CatchUp | None = None
    catch_up_limit: CatchUpLimit | None = None
    paused: bool | None = None


def schedule_template(raw: dict[str, Any]) -> dict[str, Any]:
    """A schedule's task template as stored: a task create's fields (aliases resolved, no
    available_at: a fire's task is available when it fires; no source: it is `schedule`; no
    depends_on).
    InvalidInput names the field as template.<field>."""
    for name, why in (("available_at", "a fire's task is available at the fire"),
                      ("source", "a fire's task has source 'schedule'"),
                      ("depends_on", "a fire's task depends on no other task")):
        if name in raw:
            raise InvalidInput(f"template.{name} cannot be set: {why}", field=f"template.{name}")
    try:
        req = msgspec.convert(raw, TaskCreate)
        task = new_task(req)
    except msgspec.ValidationError as exc:
        path = error_path(str(exc))
        named = _NAMED_FIELD.search(str(exc))  # a missing or an unknown field
        if named:
            path = f"{path}.{named.group(1)}" if path else named.group(1)
        field = f"template.{path}" if path else "template"
        raise InvalidInput(f"{field}: {_AT_PATH.sub('', str(exc))}", field=field) from None
    except InvalidInput as exc:
        field = f"template.{exc.field}" if exc.field else "template"
        raise InvalidInput(f"{field}: {exc}", field=field) from None
    fields = msgspec.to_builtins(task)
    return {k: v for k, v in fields.items()
            if k not in ("available_at", "source", "depends_on") and v is not None}
