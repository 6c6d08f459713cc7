"""A typed client of the Dispatch REST API, for agents and requesters (sync and async, httpx).

    with DispatchClient("http://localhost:8600", agent_id="worker-1") as dispatch:
        dispatch.register(capabilities=["code"])
        task = dispatch.claim(wait_seconds=10)
        if task is not None:
            dispatch.start(task.task_id)
            dispatch.complete(task.task_id, {"answer": 42})

A requester creates a task from its title and the other fields of dispatch.wire.TaskCreate (the
REST body) by name, `dispatch.create("summarise", rate_key="llm", cost=2)`, or from a TaskCreate.
With the admin token it also manages schedules the same way: `dispatch.create_schedule("nightly",
cron="0 3 * * *", template={"title": "re-index"})`, list_schedules, get_schedule, update_schedule,
pause_schedule, resume_schedule, run_schedule, schedule_tasks, delete_schedule.

Failures raise the errors of dispatch.errors: InvalidInput (400), Unauthorized (401), Forbidden
(403), NotFound (404), Conflict (409, with `.task`, the task's current state), else ApiError.
"""

from __future__ import annotations

import asyncio
import builtins
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypedDict, TypeVar, Unpack
from urllib.parse import quote

import httpx
import msgspec

from dispatch.errors import Conflict, DispatchError, InvalidInput, error_for_status
from dispatch.models import (
    Agent,
    AgentStatus,
    Dependencies,
    Explanation,
    NextClaim,
    ReportOutcomeWithNext,
    Schedule,
    Stats,
    Task,
    TaskEvent,
    TaskStatus,
    TaskWithNext,
)
from dispatch.sdk import tracing
from dispatch.wire import CLIENT_IDLE_SECONDS, ScheduleCreate, SchedulePatch, TaskCreate

T = TypeVar("T")
TaskRef = uuid.UUID | str


class ApiError(DispatchError):
    """A failure response without a more specific error class."""

    def __init__(self, status: int, message: str, detail: object = None) -> None:
        super().__init__(message, detail=detail)
        self.status = status


# A person's decisions on a gated task (POST /api/v1/tasks/{id}/<decision>).
DECISIONS = ("approve", "reject", "accept", "request-changes")


class Page(msgspec.Struct, frozen=True, kw_only=True):
    """One page of GET /api/v1/tasks; `next_cursor` is None on the last page."""

    tasks: list[Task]
    next_cursor: str | None


@dataclass(frozen=True)
class _Call:
    """One request, built once and sent by either transport."""

    method: str
    path: str
    json: object = None
    params: Mapping[str, str | int] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = msgspec.json.decode(response.content)
        message = str(body.get("error") or response.reason_phrase)
        detail = body.get("detail")
    except (msgspec.DecodeError, AttributeError):
        message, detail = response.text or response.reason_phrase, None
    field_name = detail.get("field") if isinstance(detail, dict) else None
    conflict = error_for_status(response.status_code) is Conflict and isinstance(detail, dict)
    task = msgspec.convert(detail, Task) if conflict else None
    raise _error(response.status_code, message, field=field_name, detail=detail, task=task)


def _error(status: int, message: str, *, field: str | None = None, detail: object = None,
           task: Task | None = None) -> DispatchError:
    """The error a refusal with `status` stands for: a 400 names its field, a 409 carries the
    task as it is now."""
    kind = error_for_status(status)
    if kind is InvalidInput:
        return InvalidInput(message, field=field, detail=detail)
    if kind is Conflict:
        return Conflict(message, task=task)
    if kind is not None:
        return kind(message)
    return ApiError(status, message, detail)


def _decode(response: httpx.Response, kind: type[T]) -> T:
    _raise_for(response)
    return msgspec.json.decode(response.content, type=kind)


class ListFilters(TypedDict, total=False):
    """Filters and paging of GET /api/v1/tasks."""

    status: Sequence[TaskStatus | str]
    requester: str
    owner: str
    assignee: str
    capability: str
    source: str
    parent_task_id: TaskRef
    limit: int
    cursor: str | None


def _omit_none(pairs: Sequence[tuple[str, object]]) -> dict[str, object]:
    return {k: v for k, v in pairs if v is not None}


def _task_create(task: str | TaskCreate, fields: Mapping[str, Any]) -> TaskCreate:
    """`task`, or a TaskCreate of the title and fields (TypeError for a name it lacks)."""
    if isinstance(task, TaskCreate):
        if fields:
            raise TypeError("give a TaskCreate or a title and fields, not both")
        return task
    return TaskCreate(title=task, **fields)


def _schedule_create(schedule: str | ScheduleCreate, fields: Mapping[str, Any]) -> ScheduleCreate:
    """`schedule`, or a ScheduleCreate of the name and fields (TypeError for a name it lacks); a
    template may be a TaskCreate."""
    if isinstance(schedule, ScheduleCreate):
        if fields:
            raise TypeError("give a ScheduleCreate or a name and fields, not both")
        return schedule
    return ScheduleCreate(name=schedule, **fields)


def _with_trace(headers: Mapping[str, str]) -> dict[str, str]:
    """A request's headers with the current span's trace context."""
    out = dict(headers)
    tracing.inject(out)
    return out


def _identity(agent_id: str, token: str | None) -> dict[str, str]:
    """Every request's headers: X-Agent-ID, and the agent's own token when it has one
    (auth.mode tokens); admin calls send the admin token instead."""
    headers = {"X-Agent-ID": agent_id}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


class _Requests:
    """The API's requests, built once for both the sync and the async client."""

    def __init__(self, agent_id: str, admin_token: str | None) -> None:
        self.agent_id = agent_id
        self.admin_token = admin_token

    def _admin(self, admin: bool = True) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"} if admin and self.admin_token else {}

    def create(self, task: str | TaskCreate, idempotency_key: str | None,
               fields: Mapping[str, Any]) -> _Call:
        body = msgspec.to_builtins(_task_create(task, fields))
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return _Call("POST", "/api/v1/tasks", body, headers=headers)

    def list(self, filters: ListFilters) -> _Call:
        params: dict[str, str | int] = {}
        status = filters.get("status")
        if status:
            params["status"] = ",".join(str(s) for s in status)
        if "limit" in filters:
            params["limit"] = filters["limit"]
        others: Mapping[str, object] = filters
        for name, value in others.items():
            if name not in {"status", "limit"} and value is not None:
                params[name] = str(value)
        return _Call("GET", "/api/v1/tasks", params=params)

    def task(self, task_id: TaskRef, action: str = "", method: str = "POST",
             body: object = None, admin: bool = False) -> _Call:
        path = f"/api/v1/tasks/{task_id}" + (f"/{action}" if action else "")
        return _Call(method, path, body, headers=self._admin(admin))

    def agent(self, agent_id: str, action: str = "", method: str = "POST",
              body: object = None, admin: bool = False) -> _Call:
        path = f"/api/v1/agents/{agent_id}" + (f"/{action}" if action else "")
        return _Call(method, path, body, headers=self._admin(admin))

    def update(self, task_id: TaskRef, metadata: Mapping[str, object] | None,
               priority: int | None, admin: bool) -> _Call:
        body = _omit_none([("metadata", metadata), ("priority", priority)])
        return self.task(task_id, method="PATCH", body=body, admin=admin)

    def cancel(self, task_id: TaskRef, reason: str | None, admin: bool) -> _Call:
        body = {"status": "cancelled", **_omit_none([("reason", reason)])}
        return self.task(task_id, method="PATCH", body=body, admin=admin)

    def depend(self, task_id: TaskRef, on: TaskRef, on_failure: str, admin: bool) -> _Call:
        return self.task(task_id, f"dependencies/{on}", method="PUT",
                         body={"on_failure": on_failure}, admin=admin)

    def undepend(self, task_id: TaskRef, on: TaskRef, admin: bool) -> _Call:
        return self.task(task_id, f"dependencies/{on}", method="DELETE", admin=admin)

    def suspend(self, task_id: TaskRef, waiting_for: str, timeout_seconds: int,
                lease: int | None) -> _Call:
        body = {"waiting_for": waiting_for, "timeout_seconds": timeout_seconds,
                **_omit_none([("lease", lease)])}
        return self.task(task_id, "suspend", body=body)

    def signal(self, task_id: TaskRef, payload: object, admin: bool) -> _Call:
        return self.task(task_id, "signal", body={"payload": payload}, admin=admin)

    def decide(self, task_id: TaskRef, decision: str, reason: str | None,
               feedback: str | None, admin: bool) -> _Call:
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {', '.join(DECISIONS)}, not {decision!r}")
        body = _omit_none([("reason", reason), ("feedback", feedback)])
        return self.task(task_id, decision, body=body, admin=admin)

    def register(self, agent_id: str | None, capabilities: Sequence[str] | None,
                 owner: str | None, max_concurrent: int | None,
                 status: AgentStatus | str | None, admin: bool) -> _Call:
        body = _omit_none([
            ("capabilities", list(capabilities) if capabilities is not None else None),
            ("owner", owner), ("max_concurrent", max_concurrent),
            ("status", str(status) if status else None),
        ])
        return self.agent(agent_id or self.agent_id, method="PUT", body=body, admin=admin)

    def heartbeat(self, status: AgentStatus | str | None) -> _Call:
        body = {"status": str(status)} if status else {}
        return self.agent(self.agent_id, "heartbeat", body=body)

    def claim(self, capabilities: Sequence[str] | None, wait_seconds: float,
              max_tasks: int | None = None, start: bool = False,
              idempotency_key: str | None = None) -> _Call:
        body: dict[str, object] = {"wait_seconds": wait_seconds}
        if capabilities is not None:
            body["capabilities"] = list(capabilities)
        if max_tasks is not None:
            body["max_tasks"] = max_tasks
        if start:
            body["start"] = True
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return _Call("POST", "/api/v1/tasks/claim", body, headers=headers)

    def report(self, task_id: TaskRef, action: str, lease: int | None,
               fields: Sequence[tuple[str, object]] = ()) -> _Call:
        """A report on an attempt; with `lease`, one the task is no longer on is refused (409)."""
        body = _omit_none([*fields, ("lease", lease)])
        return self.task(task_id, action, body=body)

    def progress(self, task_id: TaskRef, percent: float | None, message: str | None,
                 data: object, lease: int | None = None) -> _Call:
        fields = [("percent", percent), ("message", message), ("data", data)]
        return self.report(task_id, "progress", lease, fields)

    def fail(self, task_id: TaskRef, error: str | None, retry_eligible: bool,
             lease: int | None = None, then: NextClaim | None = None) -> _Call:
        fields = [("error", error), ("retry_eligible", retry_eligible), ("next", _next(then))]
        return self.report(task_id, "fail", lease, fields)

    def release(self, task_id: TaskRef, reason: str | None, lease: int | None) -> _Call:
        return self.report(task_id, "release", lease, [("reason", reason)])

    def complete(self, task_id: TaskRef, result: object, admin: bool,
                 lease: int | None = None, then: NextClaim | None = None) -> _Call:
        body: dict[str, object] = {"result": result}
        if lease is not None:
            body["lease"] = lease
        if then is not None:
            body["next"] = _next(then)
        return self.task(task_id, "complete", body=body, admin=admin)

    def reports(self, items: Sequence[Mapping[str, object]]) -> _Call:
        return _Call("POST", "/api/v1/tasks/reports", list(items))

    def stats(self) -> _Call:
        return _Call("GET", "/api/v1/stats", headers=self._admin())

    def agents(self) -> _Call:
        return _Call("GET", "/api/v1/agents", headers=self._admin())

    def drain(self, agent_id: str, drained: bool) -> _Call:
        return self.agent(agent_id, "drain" if drained else "undrain", admin=True)

    def remove(self, agent_id: str | None) -> _Call:
        return self.agent(agent_id or self.agent_id, method="DELETE", admin=True)

    def schedule(self, name: str = "", action: str = "", method: str = "GET",
                 body: object = None, params: Mapping[str, str | int] | None = None) -> _Call:
        path = "/api/v1/schedules" + (f"/{quote(name, safe='')}" if name else "")
        path += f"/{action}" if action else ""
        return _Call(method, path, body, params=params, headers=self._admin())

    def create_schedule(self, schedule: str | ScheduleCreate, fields: Mapping[str, Any]) -> _Call:
        body = msgspec.to_builtins(_schedule_create(schedule, fields))
        return self.schedule(method="POST", body=body)

    def update_schedule(self, name: str, change: SchedulePatch | None,
                        fields: Mapping[str, Any]) -> _Call:
        if change is not None and fields:
            raise TypeError("give a SchedulePatch or fields, not both")
        patch = change if change is not None else SchedulePatch(**fields)
        body = {k: v for k, v in msgspec.to_builtins(patch).items() if v is not None}
        return self.schedule(name, method="PATCH", body=body)


def _next(then: NextClaim | None) -> object:
    """A report's `next`: the claim of the agent's next tasks made in the same request."""
    return None if then is None else msgspec.to_builtins(then)


def report_item(task_id: TaskRef, action: str, *, lease: int | None = None,
                then: NextClaim | None = None, **fields: object) -> dict[str, object]:
    """One report of a batch (POST /api/v1/tasks/reports): the task, the action, and the fields
    that action's own request takes (result; error and retry_eligible; ...)."""
    item: dict[str, object] = {"task_id": str(task_id), "action": action}
    if action == "complete":
        item["result"] = fields.pop("result", None)
    item |= {k: v for k, v in fields.items() if v is not None}
    if lease is not None:
        item["lease"] = lease
    if then is not None:
        item["next"] = _next(then)
    return item


def report_outcome(outcome: ReportOutcomeWithNext) -> TaskWithNext:
    """A batch report's outcome as its single request would answer it: the task (with the next
    tasks its `next` claimed), or the error its status stands for."""
    if outcome.status == 200 and outcome.task is not None:
        return TaskWithNext(**msgspec.structs.asdict(outcome.task), next=outcome.next)
    raise _error(outcome.status, outcome.error or f"report refused ({outcome.status})",
                 field=outcome.field, task=outcome.task)


def _page(response: httpx.Response) -> Page:
    tasks = _decode(response, list[Task])
    return Page(tasks=tasks, next_cursor=response.headers.get("x-next-cursor"))


def _claimed(response: httpx.Response) -> Task | None:
    if response.status_code == 204:
        return None
    return _decode(response, Task)


def _claimed_many(response: httpx.Response) -> list[Task]:
    if response.status_code == 204:
        return []
    return _decode(response, list[Task])


# Following a task (GET /api/v1/tasks/{id}/stream): no read timeout (a quiet task sends nothing
# for as long as it runs); a dropped stream is opened again after this pause, resuming after the
# last event received.
FOLLOW_TIMEOUT = httpx.Timeout(10.0, read=None)
FOLLOW_RETRY_SECONDS = 0.5
# httpx's default pool, with idle connections given up before serve closes them.
LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20,
                      keepalive_expiry=CLIENT_IDLE_SECONDS)


class _Sse:
    """Server-sent events from lines: each named message's (event, data) once its blank line
    comes (the stream's unnamed ones are comments, to keep it open)."""

    def __init__(self) -> None:
        self.event = ""
        self.data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        if not line:
            message = (self.event, "\n".join(self.data)) if self.event else None
            self.event, self.data = "", []
            return message
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        return None


def _follow_path(task_id: TaskRef) -> str:
    return f"/api/v1/tasks/{task_id}/stream"


def _follow_headers(last: int | None) -> dict[str, str]:
    return {"Last-Event-ID": str(last)} if last is not None else {}


class DispatchClient:
    """Synchronous client; `agent_id` is sent as X-Agent-ID on every request, with `token` (the
    agent's own, auth.mode tokens) when given."""

    def __init__(
        self,
        base_url: str,
        agent_id: str,
        *,
        admin_token: str | None = None,
        token: str | None = None,
        timeout: float = 40.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._r = _Requests(agent_id, admin_token)
        self._http = httpx.Client(
            base_url=base_url, timeout=timeout, transport=transport, limits=LIMITS,
            headers=_identity(agent_id, token),
        )
        self._traced = tracing.active()

    def __enter__(self) -> DispatchClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call) -> httpx.Response:
        return self._http.request(
            call.method, call.path, json=call.json, params=call.params,
            headers=_with_trace(call.headers) if self._traced else call.headers,
        )

    # requesters
    def create(self, task: str | TaskCreate, *, idempotency_key: str | None = None,
               **fields: Any) -> Task:
        """A new task: a TaskCreate, or its title and any other of its fields by name."""
        return self.create_ex(task, idempotency_key=idempotency_key, **fields)[0]

    def create_ex(self, task: str | TaskCreate, *, idempotency_key: str | None = None,
                  **fields: Any) -> tuple[Task, bool]:
        """Like create; also whether the task is new (False when the idempotency key repeated)."""
        response = self._send(self._r.create(task, idempotency_key, fields))
        return _decode(response, Task), response.status_code == 201

    def get(self, task_id: TaskRef) -> Task:
        return _decode(self._send(self._r.task(task_id, method="GET")), Task)

    def events(self, task_id: TaskRef) -> builtins.list[TaskEvent]:
        return _decode(self._send(self._r.task(task_id, "events", "GET")), list[TaskEvent])

    def follow(self, task_id: TaskRef, *, after: int | None = None) -> Iterator[TaskEvent]:
        """The task's events as they are written: its history first (after event id `after`),
        then each new one, until the task has ended. A dropped connection is opened again,
        resuming after the last event received."""
        last = after
        while True:
            try:
                with self._http.stream("GET", _follow_path(task_id), timeout=FOLLOW_TIMEOUT,
                                       headers=_follow_headers(last)) as response:
                    if response.status_code >= 400:
                        response.read()
                        _raise_for(response)
                    sse = _Sse()
                    for line in response.iter_lines():
                        message = sse.feed(line)
                        if message is None:
                            continue
                        if message[0] == "end":
                            return
                        event = msgspec.json.decode(message[1], type=TaskEvent)
                        last = event.id
                        yield event
            except httpx.TransportError:
                pass
            time.sleep(FOLLOW_RETRY_SECONDS)

    def list(self, **filters: Unpack[ListFilters]) -> Page:
        return _page(self._send(self._r.list(filters)))

    def iter_tasks(self, **filters: Unpack[ListFilters]) -> Iterator[Task]:
        """Every matching task, following the cursor page by page."""
        while True:
            page = self.list(**filters)
            yield from page.tasks
            if page.next_cursor is None:
                return
            filters["cursor"] = page.next_cursor

    def update(self, task_id: TaskRef, *, metadata: Mapping[str, object] | None = None,
               priority: int | None = None, admin: bool = False) -> Task:
        return _decode(self._send(self._r.update(task_id, metadata, priority, admin)), Task)

    def cancel(self, task_id: TaskRef, reason: str | None = None, *, admin: bool = False) -> Task:
        return _decode(self._send(self._r.cancel(task_id, reason, admin)), Task)

    # dependencies: a task created with depends_on=[...] waits (blocked) until they complete
    def dependencies(self, task_id: TaskRef) -> Dependencies:
        """What the task waits for, with their status, result and error, and its dependents."""
        call = self._r.task(task_id, "dependencies", method="GET")
        return _decode(self._send(call), Dependencies)

    def depend(self, task_id: TaskRef, on: TaskRef, *, on_failure: str = "cancel",
               admin: bool = False) -> Task:
        """Make a waiting task (pending or blocked) depend on `on` too (its requester, or an
        admin); on_failure "run" lets it run even when `on` fails or is cancelled."""
        return _decode(self._send(self._r.depend(task_id, on, on_failure, admin)), Task)

    def undepend(self, task_id: TaskRef, on: TaskRef, *, admin: bool = False) -> Task:
        return _decode(self._send(self._r.undepend(task_id, on, admin)), Task)

    # signals: an agent suspends the task it runs; a signal resumes it with a payload
    def suspend(self, task_id: TaskRef, waiting_for: str, timeout_seconds: int, *,
                lease: int | None = None) -> Task:
        """Set the running task aside until a signal (the agent's slot is free meanwhile)."""
        call = self._r.suspend(task_id, waiting_for, timeout_seconds, lease)
        return _decode(self._send(call), Task)

    def signal(self, task_id: TaskRef, payload: object = None, *, admin: bool = False) -> Task:
        """Resume a suspended task; the payload is on the task (`signal`) for its next run."""
        return _decode(self._send(self._r.signal(task_id, payload, admin)), Task)

    # gates: a task created with approval="before_start" | "review" | "both"
    def decide(self, task_id: TaskRef, decision: str, *, reason: str | None = None,
               feedback: str | None = None, admin: bool = False) -> Task:
        """approve or reject (with a reason) a task waiting for approval; accept or
        request-changes (with feedback) a task in review. Its requester, its owner or an admin."""
        return _decode(self._send(self._r.decide(task_id, decision, reason, feedback, admin)),
                       Task)

    # agents
    def register(self, *, capabilities: Sequence[str] | None = None, owner: str | None = None,
                 max_concurrent: int | None = None, status: AgentStatus | str | None = None,
                 agent_id: str | None = None, admin: bool = False) -> Agent:
        call = self._r.register(agent_id, capabilities, owner, max_concurrent, status, admin)
        return _decode(self._send(call), Agent)

    def heartbeat(self, status: AgentStatus | str | None = None) -> Agent:
        return _decode(self._send(self._r.heartbeat(status)), Agent)

    def claim(self, capabilities: Sequence[str] | None = None,
              wait_seconds: float = 0) -> Task | None:
        return _claimed(self._send(self._r.claim(capabilities, wait_seconds)))

    def claim_many(self, max_tasks: int, *, capabilities: Sequence[str] | None = None,
                   wait_seconds: float = 0, start: bool = False,
                   idempotency_key: str | None = None) -> builtins.list[Task]:
        """Up to max_tasks tasks (started too with `start`), waiting up to wait_seconds. Sent
        again with the same idempotency_key after its answer was lost (a dropped connection),
        the claim answers what it took the first time."""
        call = self._r.claim(capabilities, wait_seconds, max_tasks, start, idempotency_key)
        return _claimed_many(self._send(call))

    def start(self, task_id: TaskRef, *, lease: int | None = None) -> Task:
        return _decode(self._send(self._r.report(task_id, "start", lease)), Task)

    def progress(self, task_id: TaskRef, percent: float | None = None,
                 message: str | None = None, data: object = None, *,
                 lease: int | None = None) -> Task:
        call = self._r.progress(task_id, percent, message, data, lease)
        return _decode(self._send(call), Task)

    def complete(self, task_id: TaskRef, result: object = None, *, admin: bool = False,
                 lease: int | None = None, then: NextClaim | None = None) -> TaskWithNext:
        """The task completed; with `then`, also the agent's next tasks, claimed in the same
        request (the answer's `next`)."""
        call = self._r.complete(task_id, result, admin, lease, then)
        return _decode(self._send(call), TaskWithNext)

    def fail(self, task_id: TaskRef, error: str | None = None, *,
             retry_eligible: bool = True, lease: int | None = None,
             then: NextClaim | None = None) -> TaskWithNext:
        """The task failed; with `then`, also the agent's next tasks (the answer's `next`)."""
        call = self._r.fail(task_id, error, retry_eligible, lease, then)
        return _decode(self._send(call), TaskWithNext)

    def release(self, task_id: TaskRef, reason: str | None = None, *,
                lease: int | None = None) -> Task:
        """Give the task back unfinished: pending again, no attempt counted (event released)."""
        return _decode(self._send(self._r.release(task_id, reason, lease)), Task)

    def reports(
        self, items: Sequence[Mapping[str, object]]
    ) -> builtins.list[ReportOutcomeWithNext]:
        """Several reports of this agent in one request and transaction (see report_item); one
        outcome per report, in order, each with the status its single request would give
        (report_outcome turns one into that request's answer)."""
        return _decode(self._send(self._r.reports(items)), list[ReportOutcomeWithNext])

    # admin
    def stats(self) -> Stats:
        return _decode(self._send(self._r.stats()), Stats)

    def agents(self) -> builtins.list[Agent]:
        return _decode(self._send(self._r.agents()), list[Agent])

    def drain(self, agent_id: str, drained: bool = True) -> Agent:
        return _decode(self._send(self._r.drain(agent_id, drained)), Agent)

    def remove_agent(self, agent_id: str | None = None) -> None:
        """Remove an agent (this client's own by default; another's with the admin token) that
        holds no active tasks; Conflict naming them otherwise."""
        _raise_for(self._send(self._r.remove(agent_id)))

    def requeue(self, task_id: TaskRef) -> Task:
        return _decode(self._send(self._r.task(task_id, "requeue", admin=True)), Task)

    def explain(self, task_id: TaskRef) -> Explanation:
        call = self._r.task(task_id, "explain", method="GET", admin=True)
        return _decode(self._send(call), Explanation)

    # schedules (admin): docs/schedules.md
    def create_schedule(self, schedule: str | ScheduleCreate, **fields: Any) -> Schedule:
        """A new schedule: a ScheduleCreate, or its name and the other fields by name, e.g.
        create_schedule("nightly", cron="0 3 * * *", template={"title": "re-index"}) (the
        template is the body of a task create, a dict or a TaskCreate). Conflict when the name
        is taken; InvalidInput names the field (cron, timezone, template.priority, ...)."""
        return _decode(self._send(self._r.create_schedule(schedule, fields)), Schedule)

    def list_schedules(self) -> builtins.list[Schedule]:
        return _decode(self._send(self._r.schedule()), list[Schedule])

    def get_schedule(self, name: str) -> Schedule:
        return _decode(self._send(self._r.schedule(name)), Schedule)

    def update_schedule(self, name: str, change: SchedulePatch | None = None,
                        **fields: Any) -> Schedule:
        """Change the fields given (a SchedulePatch, or the fields by name); a template replaces
        the old one whole, a new cron or timezone applies from now on."""
        return _decode(self._send(self._r.update_schedule(name, change, fields)), Schedule)

    def pause_schedule(self, name: str) -> Schedule:
        return _decode(self._send(self._r.schedule(name, "pause", method="POST")), Schedule)

    def resume_schedule(self, name: str) -> Schedule:
        """Fires again from now on (the fires it missed while paused are not made)."""
        return _decode(self._send(self._r.schedule(name, "resume", method="POST")), Schedule)

    def delete_schedule(self, name: str) -> None:
        """Delete the schedule; the tasks it made stay."""
        _raise_for(self._send(self._r.schedule(name, method="DELETE")))

    def run_schedule(self, name: str) -> Task:
        """Run now: one task from the schedule's template at once."""
        return _decode(self._send(self._r.schedule(name, "run", method="POST")), Task)

    def schedule_tasks(self, name: str, limit: int = 20) -> builtins.list[Task]:
        """The newest tasks the schedule made, newest first (limit 1 to 500)."""
        call = self._r.schedule(name, "tasks", params={"limit": limit})
        return _decode(self._send(call), list[Task])


class AsyncDispatchClient:
    """The same API for asyncio agents; every method is a coroutine."""

    def __init__(
        self,
        base_url: str,
        agent_id: str,
        *,
        admin_token: str | None = None,
        token: str | None = None,
        timeout: float = 40.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._r = _Requests(agent_id, admin_token)
        self._http = httpx.AsyncClient(
            base_url=base_url, timeout=timeout, transport=transport, limits=LIMITS,
            headers=_identity(agent_id, token),
        )
        self._traced = tracing.active()

    async def __aenter__(self) -> AsyncDispatchClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call) -> httpx.Response:
        return await self._http.request(
            call.method, call.path, json=call.json, params=call.params,
            headers=_with_trace(call.headers) if self._traced else call.headers,
        )

    # requesters
    async def create(self, task: str | TaskCreate, *, idempotency_key: str | None = None,
                     **fields: Any) -> Task:
        """A new task: a TaskCreate, or its title and any other of its fields by name."""
        return (await self.create_ex(task, idempotency_key=idempotency_key, **fields))[0]

    async def create_ex(self, task: str | TaskCreate, *, idempotency_key: str | None = None,
                        **fields: Any) -> tuple[Task, bool]:
        """Like create; also whether the task is new (False when the idempotency key repeated)."""
        response = await self._send(self._r.create(task, idempotency_key, fields))
        return _decode(response, Task), response.status_code == 201

    async def get(self, task_id: TaskRef) -> Task:
        return _decode(await self._send(self._r.task(task_id, method="GET")), Task)

    async def follow(self, task_id: TaskRef, *,
                     after: int | None = None) -> AsyncIterator[TaskEvent]:
        """As DispatchClient.follow."""
        last = after
        while True:
            try:
                async with self._http.stream("GET", _follow_path(task_id),
                                             timeout=FOLLOW_TIMEOUT,
                                             headers=_follow_headers(last)) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        _raise_for(response)
                    sse = _Sse()
                    async for line in response.aiter_lines():
                        message = sse.feed(line)
                        if message is None:
                            continue
                        if message[0] == "end":
                            return
                        event = msgspec.json.decode(message[1], type=TaskEvent)
                        last = event.id
                        yield event
            except httpx.TransportError:
                pass
            await asyncio.sleep(FOLLOW_RETRY_SECONDS)

    async def events(self, task_id: TaskRef) -> builtins.list[TaskEvent]:
        return _decode(await self._send(self._r.task(task_id, "events", "GET")), list[TaskEvent])

    async def list(self, **filters: Unpack[ListFilters]) -> Page:
        return _page(await self._send(self._r.list(filters)))

    async def iter_tasks(self, **filters: Unpack[ListFilters]) -> AsyncIterator[Task]:
        """Every matching task, following the cursor page by page."""
        while True:
            page = await self.list(**filters)
            for task in page.tasks:
                yield task
            if page.next_cursor is None:
                return
            filters["cursor"] = page.next_cursor

    async def update(self, task_id: TaskRef, *, metadata: Mapping[str, object] | None = None,
                     priority: int | None = None, admin: bool = False) -> Task:
        return _decode(await self._send(self._r.update(task_id, metadata, priority, admin)), Task)

    async def cancel(self, task_id: TaskRef, reason: str | None = None, *,
                     admin: bool = False) -> Task:
        return _decode(await self._send(self._r.cancel(task_id, reason, admin)), Task)

    async def dependencies(self, task_id: TaskRef) -> Dependencies:
        call = self._r.task(task_id, "dependencies", method="GET")
        return _decode(await self._send(call), Dependencies)

    async def depend(self, task_id: TaskRef, on: TaskRef, *, on_failure: str = "cancel",
                     admin: bool = False) -> Task:
        return _decode(await self._send(self._r.depend(task_id, on, on_failure, admin)), Task)

    async def undepend(self, task_id: TaskRef, on: TaskRef, *, admin: bool = False) -> Task:
        return _decode(await self._send(self._r.undepend(task_id, on, admin)), Task)

    async def suspend(self, task_id: TaskRef, waiting_for: str, timeout_seconds: int, *,
                      lease: int | None = None) -> Task:
        call = self._r.suspend(task_id, waiting_for, timeout_seconds, lease)
        return _decode(await self._send(call), Task)

    async def signal(self, task_id: TaskRef, payload: object = None, *,
                     admin: bool = False) -> Task:
        return _decode(await self._send(self._r.signal(task_id, payload, admin)), Task)

    async def decide(self, task_id: TaskRef, decision: str, *, reason: str | None = None,
                     feedback: str | None = None, admin: bool = False) -> Task:
        call = self._r.decide(task_id, decision, reason, feedback, admin)
        return _decode(await self._send(call), Task)

    # agents
    async def register(self, *, capabilities: Sequence[str] | None = None,
                       owner: str | None = None, max_concurrent: int | None = None,
                       status: AgentStatus | str | None = None, agent_id: str | None = None,
                       admin: bool = False) -> Agent:
        call = self._r.register(agent_id, capabilities, owner, max_concurrent, status, admin)
        return _decode(await self._send(call), Agent)

    async def heartbeat(self, status: AgentStatus | str | None = None) -> Agent:
        return _decode(await self._send(self._r.heartbeat(status)), Agent)

    async def claim(self, capabilities: Sequence[str] | None = None,
                    wait_seconds: float = 0) -> Task | None:
        return _claimed(await self._send(self._r.claim(capabilities, wait_seconds)))

    async def claim_many(self, max_tasks: int, *, capabilities: Sequence[str] | None = None,
                         wait_seconds: float = 0, start: bool = False,
                         idempotency_key: str | None = None) -> builtins.list[Task]:
        """Up to max_tasks tasks (started too with `start`), waiting up to wait_seconds; the
        same idempotency_key again answers what the first claim took."""
        call = self._r.claim(capabilities, wait_seconds, max_tasks, start, idempotency_key)
        return _claimed_many(await self._send(call))

    async def start(self, task_id: TaskRef, *, lease: int | None = None) -> Task:
        return _decode(await self._send(self._r.report(task_id, "start", lease)), Task)

    async def progress(self, task_id: TaskRef, percent: float | None = None,
                       message: str | None = None, data: object = None, *,
                       lease: int | None = None) -> Task:
        call = self._r.progress(task_id, percent, message, data, lease)
        return _decode(await self._send(call), Task)

    async def complete(self, task_id: TaskRef, result: object = None, *, admin: bool = False,
                       lease: int | None = None, then: NextClaim | None = None) -> TaskWithNext:
        """The task completed; with `then`, also the agent's next tasks, claimed in the same
        request (the answer's `next`)."""
        call = self._r.complete(task_id, result, admin, lease, then)
        return _decode(await self._send(call), TaskWithNext)

    async def fail(self, task_id: TaskRef, error: str | None = None, *,
                   retry_eligible: bool = True, lease: int | None = None,
                   then: NextClaim | None = None) -> TaskWithNext:
        """The task failed; with `then`, also the agent's next tasks (the answer's `next`)."""
        call = self._r.fail(task_id, error, retry_eligible, lease, then)
        return _decode(await self._send(call), TaskWithNext)

    async def release(self, task_id: TaskRef, reason: str | None = None, *,
                      lease: int | None = None) -> Task:
        """Give the task back unfinished: pending again, no attempt counted (event released)."""
        return _decode(await self._send(self._r.release(task_id, reason, lease)), Task)

    async def reports(
        self, items: Sequence[Mapping[str, object]]
    ) -> builtins.list[ReportOutcomeWithNext]:
        """Several reports of this agent in one request and transaction (see report_item); one
        outcome per report, in order, each with the status its single request would give."""
        return _decode(await self._send(self._r.reports(items)), list[ReportOutcomeWithNext])

    # admin
    async def stats(self) -> Stats:
        return _decode(await self._send(self._r.stats()), Stats)

    async def agents(self) -> builtins.list[Agent]:
        return _decode(await self._send(self._r.agents()), list[Agent])

    async def drain(self, agent_id: str, drained: bool = True) -> Agent:
        return _decode(await self._send(self._r.drain(agent_id, drained)), Agent)

    async def remove_agent(self, agent_id: str | None = None) -> None:
        _raise_for(await self._send(self._r.remove(agent_id)))

    async def requeue(self, task_id: TaskRef) -> Task:
        return _decode(await self._send(self._r.task(task_id, "requeue", admin=True)), Task)

    async def explain(self, task_id: TaskRef) -> Explanation:
        call = self._r.task(task_id, "explain", method="GET", admin=True)
        return _decode(await self._send(call), Explanation)

    # schedules (admin): docs/schedules.md
    async def create_schedule(self, schedule: str | ScheduleCreate, **fields: Any) -> Schedule:
        """A new schedule: a ScheduleCreate, or its name and the other fields by name."""
        return _decode(await self._send(self._r.create_schedule(schedule, fields)), Schedule)

    async def list_schedules(self) -> builtins.list[Schedule]:
        return _decode(await self._send(self._r.schedule()), list[Schedule])

    async def get_schedule(self, name: str) -> Schedule:
        return _decode(await self._send(self._r.schedule(name)), Schedule)

    async def update_schedule(self, name: str, change: SchedulePatch | None = None,
                              **fields: Any) -> Schedule:
        """Change the fields given (a SchedulePatch, or the fields by name)."""
        call = self._r.update_schedule(name, change, fields)
        return _decode(await self._send(call), Schedule)

    async def pause_schedule(self, name: str) -> Schedule:
        call = self._r.schedule(name, "pause", method="POST")
        return _decode(await self._send(call), Schedule)

    async def resume_schedule(self, name: str) -> Schedule:
        call = self._r.schedule(name, "resume", method="POST")
        return _decode(await self._send(call), Schedule)

    async def delete_schedule(self, name: str) -> None:
        _raise_for(await self._send(self._r.schedule(name, method="DELETE")))

    async def run_schedule(self, name: str) -> Task:
        """Run now: one task from the schedule's template at once."""
        return _decode(await self._send(self._r.schedule(name, "run", method="POST")), Task)

    async def schedule_tasks(self, name: str, limit: int = 20) -> builtins.list[Task]:
        call = self._r.schedule(name, "tasks", params={"limit": limit})
        return _decode(await self._send(call), list[Task])
