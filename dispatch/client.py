"""A typed client of the Dispatch REST API, for agents and requesters (sync and async, httpx).

    with DispatchClient("http://localhost:8600", agent_id="worker-1") as dispatch:
        dispatch.register(capabilities=["code"])
        task = dispatch.claim(wait_seconds=10)
        if task is not None:
            dispatch.start(task.task_id)
            dispatch.complete(task.task_id, {"answer": 42})

Failures raise the errors of dispatch.errors: InvalidInput (400), Unauthorized (401), Forbidden
(403), NotFound (404), Conflict (409, with `.task`, the task's current state), else ApiError.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import httpx
import msgspec

from dispatch.errors import Conflict, DispatchError, InvalidInput, error_for_status
from dispatch.models import Agent, AgentStatus, Stats, Task, TaskEvent, TaskStatus

T = TypeVar("T")
TaskRef = uuid.UUID | str
_UNSET: Any = object()


class ApiError(DispatchError):
    """A failure response without a more specific error class."""

    def __init__(self, status: int, message: str, detail: object = None) -> None:
        super().__init__(message, detail=detail)
        self.status = status


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
    status = response.status_code
    kind = error_for_status(status)
    if kind is InvalidInput:
        field_name = detail.get("field") if isinstance(detail, dict) else None
        raise InvalidInput(message, field=field_name, detail=detail)
    if kind is Conflict:
        task = msgspec.convert(detail, Task) if isinstance(detail, dict) else None
        raise Conflict(message, task=task)
    if kind is not None:
        raise kind(message)
    raise ApiError(status, message, detail)


def _decode(response: httpx.Response, kind: type[T]) -> T:
    _raise_for(response)
    return msgspec.json.decode(response.content, type=kind)


def _drop_unset(body: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in body.items() if v is not _UNSET}


class _Requests:
    """The API's requests, independent of sync/async."""

    def __init__(self, agent_id: str, admin_token: str | None) -> None:
        self.agent_id = agent_id
        self.admin_token = admin_token

    def _admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}

    def create(
        self,
        title: str,
        *,
        idempotency_key: str | None = None,
        description: str = _UNSET,
        owner: str = _UNSET,
        required_capabilities: Sequence[str] = _UNSET,
        priority: int = _UNSET,
        timeout_seconds: int = _UNSET,
        heartbeat_seconds: int = _UNSET,
        max_retries: int = _UNSET,
        metadata: Mapping[str, object] = _UNSET,
        parent_task_id: TaskRef = _UNSET,
        available_at: datetime = _UNSET,
        source: str = _UNSET,
    ) -> _Call:
        body = _drop_unset({
            "title": title, "description": description, "owner": owner,
            "required_capabilities": (
                list(required_capabilities) if required_capabilities is not _UNSET else _UNSET
            ),
            "priority": priority, "timeout_seconds": timeout_seconds,
            "heartbeat_seconds": heartbeat_seconds, "max_retries": max_retries,
            "metadata": metadata,
            "parent_task_id": str(parent_task_id) if parent_task_id is not _UNSET else _UNSET,
            "available_at": available_at.isoformat() if available_at is not _UNSET else _UNSET,
            "source": source,
        })
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return _Call("POST", "/api/v1/tasks", body, headers=headers)

    def list(
        self,
        *,
        status: Sequence[TaskStatus | str] | None = None,
        requester: str | None = None,
        owner: str | None = None,
        assignee: str | None = None,
        capability: str | None = None,
        source: str | None = None,
        parent_task_id: TaskRef | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> _Call:
        params: dict[str, str | int] = {}
        if status:
            params["status"] = ",".join(str(s) for s in status)
        for name, value in (("requester", requester), ("owner", owner), ("assignee", assignee),
                            ("capability", capability), ("source", source),
                            ("parent_task_id", parent_task_id), ("cursor", cursor)):
            if value is not None:
                params[name] = str(value)
        if limit is not None:
            params["limit"] = limit
        return _Call("GET", "/api/v1/tasks", params=params)

    def task(self, task_id: TaskRef, action: str = "", method: str = "POST",
             body: object = None, admin: bool = False) -> _Call:
        path = f"/api/v1/tasks/{task_id}" + (f"/{action}" if action else "")
        return _Call(method, path, body, headers=self._admin() if admin else {})

    def agent(self, agent_id: str, action: str = "", method: str = "POST",
              body: object = None, admin: bool = False) -> _Call:
        path = f"/api/v1/agents/{agent_id}" + (f"/{action}" if action else "")
        return _Call(method, path, body, headers=self._admin() if admin else {})


def _page(response: httpx.Response) -> Page:
    tasks = _decode(response, list[Task])
    return Page(tasks=tasks, next_cursor=response.headers.get("x-next-cursor"))


def _claimed(response: httpx.Response) -> Task | None:
    if response.status_code == 204:
        return None
    return _decode(response, Task)


class DispatchClient:
    """Synchronous client; `agent_id` is sent as X-Agent-ID on every request."""

    def __init__(
        self,
        base_url: str,
        agent_id: str,
        *,
        admin_token: str | None = None,
        timeout: float = 40.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._r = _Requests(agent_id, admin_token)
        self._http = httpx.Client(
            base_url=base_url, timeout=timeout, transport=transport,
            headers={"X-Agent-ID": agent_id},
        )

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
            call.method, call.path, json=call.json, params=call.params, headers=call.headers
        )

    # requesters
    def create(self, title: str, **fields: Any) -> Task:
        return _decode(self._send(self._r.create(title, **fields)), Task)

    def create_ex(self, title: str, **fields: Any) -> tuple[Task, bool]:
        """Like create; also whether the task is new (False when the idempotency key repeated)."""
        response = self._send(self._r.create(title, **fields))
        return _decode(response, Task), response.status_code == 201

    def get(self, task_id: TaskRef) -> Task:
        return _decode(self._send(self._r.task(task_id, method="GET")), Task)

    def events(self, task_id: TaskRef) -> builtins.list[TaskEvent]:
        return _decode(self._send(self._r.task(task_id, "events", "GET")), list[TaskEvent])

    def list(self, **filters: Any) -> Page:
        return _page(self._send(self._r.list(**filters)))

    def iter_tasks(self, **filters: Any) -> Iterator[Task]:
        """Every matching task, following the cursor page by page."""
        cursor = None
        while True:
            page = self.list(**filters, cursor=cursor)
            yield from page.tasks
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def update(self, task_id: TaskRef, *, metadata: Mapping[str, object] | None = None,
               priority: int | None = None, admin: bool = False) -> Task:
        body = {k: v for k, v in (("metadata", metadata), ("priority", priority)) if v is not None}
        return _decode(self._send(self._r.task(task_id, method="PATCH", body=body,
                                               admin=admin)), Task)

    def cancel(self, task_id: TaskRef, reason: str | None = None, *, admin: bool = False) -> Task:
        body: dict[str, object] = {"status": "cancelled"}
        if reason is not None:
            body["reason"] = reason
        return _decode(self._send(self._r.task(task_id, method="PATCH", body=body,
                                               admin=admin)), Task)

    # agents
    def register(self, *, capabilities: Sequence[str] | None = None, owner: str | None = None,
                 max_concurrent: int | None = None, status: AgentStatus | str | None = None,
                 agent_id: str | None = None, admin: bool = False) -> Agent:
        body = {k: v for k, v in (("capabilities", list(capabilities) if capabilities is not None
                                   else None), ("owner", owner),
                                  ("max_concurrent", max_concurrent),
                                  ("status", str(status) if status else None)) if v is not None}
        call = self._r.agent(agent_id or self._r.agent_id, method="PUT", body=body, admin=admin)
        return _decode(self._send(call), Agent)

    def heartbeat(self, status: AgentStatus | str | None = None) -> Agent:
        body = {"status": str(status)} if status else {}
        return _decode(self._send(self._r.agent(self._r.agent_id, "heartbeat", body=body)), Agent)

    def claim(self, capabilities: Sequence[str] | None = None, wait_seconds: float = 0) -> \
            Task | None:
        body: dict[str, object] = {"wait_seconds": wait_seconds}
        if capabilities is not None:
            body["capabilities"] = list(capabilities)
        return _claimed(self._send(_Call("POST", "/api/v1/tasks/claim", body)))

    def start(self, task_id: TaskRef) -> Task:
        return _decode(self._send(self._r.task(task_id, "start")), Task)

    def progress(self, task_id: TaskRef, percent: float | None = None,
                 message: str | None = None, data: object = None) -> Task:
        body = {k: v for k, v in (("percent", percent), ("message", message), ("data", data))
                if v is not None}
        return _decode(self._send(self._r.task(task_id, "progress", body=body)), Task)

    def complete(self, task_id: TaskRef, result: object = None, *, admin: bool = False) -> Task:
        call = self._r.task(task_id, "complete", body={"result": result}, admin=admin)
        return _decode(self._send(call), Task)

    def fail(self, task_id: TaskRef, error: str | None = None, *,
             retry_eligible: bool = True) -> Task:
        body = {"error": error, "retry_eligible": retry_eligible}
        return _decode(self._send(self._r.task(task_id, "fail", body=body)), Task)

    # admin
    def stats(self) -> Stats:
        return _decode(self._send(_Call("GET", "/api/v1/stats", headers=self._r._admin())), Stats)

    def agents(self) -> builtins.list[Agent]:
        call = _Call("GET", "/api/v1/agents", headers=self._r._admin())
        return _decode(self._send(call), list[Agent])

    def drain(self, agent_id: str, drained: bool = True) -> Agent:
        call = self._r.agent(agent_id, "drain" if drained else "undrain", admin=True)
        return _decode(self._send(call), Agent)

    def requeue(self, task_id: TaskRef) -> Task:
        return _decode(self._send(self._r.task(task_id, "requeue", admin=True)), Task)

    def explain(self, task_id: TaskRef) -> dict[str, Any]:
        call = self._r.task(task_id, "explain", method="GET", admin=True)
        return _decode(self._send(call), dict[str, Any])


class AsyncDispatchClient:
    """The same API for asyncio agents; every method is a coroutine."""

    def __init__(
        self,
        base_url: str,
        agent_id: str,
        *,
        admin_token: str | None = None,
        timeout: float = 40.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._r = _Requests(agent_id, admin_token)
        self._http = httpx.AsyncClient(
            base_url=base_url, timeout=timeout, transport=transport,
            headers={"X-Agent-ID": agent_id},
        )

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
            call.method, call.path, json=call.json, params=call.params, headers=call.headers
        )

    async def create(self, title: str, **fields: Any) -> Task:
        return _decode(await self._send(self._r.create(title, **fields)), Task)

    async def get(self, task_id: TaskRef) -> Task:
        return _decode(await self._send(self._r.task(task_id, method="GET")), Task)

    async def list(self, **filters: Any) -> Page:
        return _page(await self._send(self._r.list(**filters)))

    async def cancel(self, task_id: TaskRef, reason: str | None = None) -> Task:
        body: dict[str, object] = {"status": "cancelled"}
        if reason is not None:
            body["reason"] = reason
        return _decode(await self._send(self._r.task(task_id, method="PATCH", body=body)), Task)

    async def register(self, *, capabilities: Sequence[str] | None = None,
                       max_concurrent: int | None = None) -> Agent:
        body = {k: v for k, v in (("capabilities", list(capabilities) if capabilities is not None
                                   else None), ("max_concurrent", max_concurrent))
                if v is not None}
        call = self._r.agent(self._r.agent_id, method="PUT", body=body)
        return _decode(await self._send(call), Agent)

    async def claim(self, capabilities: Sequence[str] | None = None,
                    wait_seconds: float = 0) -> Task | None:
        body: dict[str, object] = {"wait_seconds": wait_seconds}
        if capabilities is not None:
            body["capabilities"] = list(capabilities)
        return _claimed(await self._send(_Call("POST", "/api/v1/tasks/claim", body)))

    async def start(self, task_id: TaskRef) -> Task:
        return _decode(await self._send(self._r.task(task_id, "start")), Task)

    async def progress(self, task_id: TaskRef, percent: float | None = None,
                       message: str | None = None, data: object = None) -> Task:
        body = {k: v for k, v in (("percent", percent), ("message", message), ("data", data))
                if v is not None}
        return _decode(await self._send(self._r.task(task_id, "progress", body=body)), Task)

    async def complete(self, task_id: TaskRef, result: object = None) -> Task:
        call = self._r.task(task_id, "complete", body={"result": result})
        return _decode(await self._send(call), Task)

    async def fail(self, task_id: TaskRef, error: str | None = None, *,
                   retry_eligible: bool = True) -> Task:
        body = {"error": error, "retry_eligible": retry_eligible}
        return _decode(await self._send(self._r.task(task_id, "fail", body=body)), Task)
