"""NATS via Hermes (SPEC section 6): one connection per process that connects and reconnects in the
background, and the inbound subscriptions (queue group `dispatch`) that create tasks, take agent
reports and update the directory. The outbound side is dispatch.relay."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated

import msgspec
import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from dispatch.broker import Broker
from dispatch.errors import Conflict, DispatchError, InvalidInput, NotFound
from dispatch.models import AgentStatus, Task
from dispatch.wire import new_task, progress_fields

log = logging.getLogger(__name__)

QUEUE_GROUP = "dispatch"
# Every message the relay publishes carries this header with the value ORIGIN_RELAY. The outbound
# event subjects swarm.task.<id>.started|progress|completed|failed are also the inbound report
# subjects, so the inbound side drops any message that has it: Dispatch never takes its own event
# for an agent's report (and never answers the relay's JetStream ack inbox).
ORIGIN_HEADER = "Dispatch-Origin"
ORIGIN_RELAY = "relay"
# Dispatch's replies to inbound messages carry ORIGIN_HEADER: ORIGIN_INBOUND. A report subject is
# also a subject of the stream DISPATCH_EVENTS, so JetStream stores the report and acks it to the
# same reply subject: an agent that wants Dispatch's answer takes the reply with this header.
ORIGIN_INBOUND = "inbound"
AGENT_ID_HEADER = "X-Agent-ID"
IDEMPOTENCY_HEADER = "Idempotency-Key"

SUBJECT_REQUEST = "swarm.task.request"
REPORT_KINDS = ("started", "progress", "completed", "failed")
SUBJECT_AGENT = "swarm.agent.>"

_AGENT_ID = re.compile(r"^[A-Za-z0-9._:@/-]{1,128}$")


# -- the connection -------------------------------------------------------------------------------


class NatsConnection:
    """The process's NATS connection. `start()` returns at once: when NATS is down the first
    connection is retried in the background, and afterwards nats-py reconnects forever. `health()`
    is what GET /health reports for nats."""

    def __init__(self, url: str, *, name: str = "dispatch", connect_timeout: float = 2.0) -> None:
        self.url = url
        self.name = name
        self.connect_timeout = connect_timeout
        self.nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self.connected = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.disconnected.set()
        self._task: asyncio.Task[None] | None = None

    @property
    def is_connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    def jetstream(self) -> JetStreamContext:
        """The connection's one JetStream context (each context makes its own ack subscription,
        so it is made once, not per publish)."""
        assert self.nc is not None, "not connected yet"
        if self._js is None:
            self._js = self.nc.jetstream()
        return self._js

    def health(self) -> dict[str, object]:
        return {"nats": "ok" if self.is_connected else "down"}

    async def start(self) -> None:
        self._task = asyncio.create_task(self._connect(), name="dispatch-nats-connect")

    async def wait_connected(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.connected.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.nc is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may fail; ignore
                await asyncio.wait_for(self.nc.close(), 5)
        self._down()

    def _up(self) -> None:
        self.disconnected.clear()
        self.connected.set()

    def _down(self) -> None:
        self.connected.clear()
        self.disconnected.set()

    async def _connect(self) -> None:
        delay = 0.1
        while True:
            try:
                self.nc = await nats.connect(
                    servers=[self.url],
                    name=self.name,
                    connect_timeout=self.connect_timeout,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    error_cb=self._on_error,
                    closed_cb=self._on_disconnected,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # nats-py raises several unrelated kinds; all mean "retry"
                log.warning("NATS %s unreachable (%s); retrying", self.url, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            log.info("connected to NATS %s", self.url)
            self._up()
            return

    async def _on_disconnected(self) -> None:
        if self.connected.is_set():
            log.warning("NATS connection lost; reconnecting")
        self._down()

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS %s", self.url)
        self._up()

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS error: %s", exc)


# -- inbound messages -----------------------------------------------------------------------------


class TaskRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of swarm.task.request: the REST create body, plus who asks and an idempotency key
    (also accepted as the headers X-Agent-ID and Idempotency-Key)."""

    title: str
    description: str = ""
    requester: str | None = None
    owner: str | None = None
    required_capabilities: list[str] | None = None
    scope: str | None = None
    priority: int = 0
    timeout_seconds: int | None = None
    heartbeat_seconds: int | None = None
    max_retries: int = 3
    metadata: dict[str, object] | None = None
    context: dict[str, object] | None = None
    parent_task_id: uuid.UUID | None = None
    available_at: datetime | None = None
    source: str = "nats"
    idempotency_key: str | None = None


class StartedReport(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    agent_id: str


class ProgressReport(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Ours (percent, message, data) or the original service's shape (progress, detail)."""

    agent_id: str
    percent: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None
    message: str | None = None
    data: object = None
    progress: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None
    detail: object = None


class CompletedReport(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    agent_id: str
    result: dict[str, object] | None = None


class FailedReport(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    agent_id: str
    error: str | None = None
    retry_eligible: bool = True


Report = StartedReport | ProgressReport | CompletedReport | FailedReport
_REPORT_TYPES: dict[str, type[Report]] = {
    "started": StartedReport,
    "progress": ProgressReport,
    "completed": CompletedReport,
    "failed": FailedReport,
}


class AgentAnnouncement(msgspec.Struct, frozen=True, kw_only=True):
    """Optional body of swarm.agent.<id>.<state>; other fields (Hermes/Warren's own) are ignored."""

    capabilities: list[str] | None = None
    owner: str | None = None
    max_concurrent: int | None = None


class ErrorReply(msgspec.Struct, frozen=True, kw_only=True):
    """The reply to a message Dispatch could not act on; `status` is the REST status it would get,
    and a 409's detail is the task as it is now."""

    error: str
    status: int
    detail: object = None


def _error_reply(exc: DispatchError) -> ErrorReply:
    detail: object = None
    if isinstance(exc, InvalidInput):
        detail = {"field": exc.field}
    elif isinstance(exc, Conflict):
        detail = exc.task
    return ErrorReply(error=exc.message, status=exc.status, detail=detail)


def _invalid(message: str, detail: object = None) -> ErrorReply:
    return ErrorReply(error=message, status=400, detail=detail)


_Handler = Callable[[Msg], Awaitable[object]]


class NatsInbound:
    """Subscribes, in queue group `dispatch` (so each message is handled by one replica), to
    swarm.task.request, swarm.task.<id>.started|progress|completed|failed and swarm.agent.>.
    Each subscription handles its messages one at a time, in arrival order; every outcome goes to
    the reply subject when the message has one."""

    def __init__(self, nats_conn: NatsConnection, broker: Broker) -> None:
        self.nats = nats_conn
        self.broker = broker
        self.store = broker.store
        self.handled = 0
        self._subs: list[Subscription] = []
        self._busy = 0
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._subscribe(), name="dispatch-nats-inbound")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for sub in self._subs:
            with contextlib.suppress(Exception):  # the connection may already be closed
                await sub.unsubscribe()
        self._subs.clear()

    async def idle(self, timeout: float) -> bool:
        """Wait until every message delivered so far has been handled (tests use it to know that
        nothing else is on its way)."""
        assert self.nats.nc is not None
        await self.nats.nc.flush(int(max(timeout, 1)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._busy or any(s.pending_msgs for s in self._subs):
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def _subscribe(self) -> None:
        # nats-py keeps subscriptions across reconnects; they only need making once.
        await self.nats.connected.wait()
        nc = self.nats.nc
        assert nc is not None
        routes: list[tuple[str, _Handler]] = [(SUBJECT_REQUEST, self._on_request)]
        routes += [(f"swarm.task.*.{kind}", self._on_report) for kind in REPORT_KINDS]
        routes.append((SUBJECT_AGENT, self._on_agent))
        for subject, handler in routes:
            self._subs.append(
                await nc.subscribe(subject, queue=QUEUE_GROUP, cb=self._guarded(handler))
            )
        await nc.flush()
        self.subscribed.set()
        log.info("NATS inbound subscribed", extra={"queue": QUEUE_GROUP})

    def _guarded(self, handler: _Handler) -> Callable[[Msg], Awaitable[None]]:
        async def run(msg: Msg) -> None:
            if (msg.headers or {}).get(ORIGIN_HEADER) == ORIGIN_RELAY:
                return  # our own outbound event, not an agent's report
            self._busy += 1
            try:
                reply = await handler(msg)
            except DispatchError as exc:
                reply = _error_reply(exc)
            except Exception:  # a bug must not kill the subscription; answer like a 500
                log.exception("NATS inbound handler failed on %s", msg.subject)
                reply = ErrorReply(error="internal error", status=500)
            finally:
                self._busy -= 1
            self.handled += 1
            if msg.reply and self.nats.nc is not None:
                try:
                    await self.nats.nc.publish(
                        msg.reply, msgspec.json.encode(reply),
                        headers={ORIGIN_HEADER: ORIGIN_INBOUND},
                    )
                except Exception as exc:  # the requester is gone or NATS is down: nothing to do
                    log.warning("could not reply on %s: %s", msg.subject, exc)

        return run

    async def _on_request(self, msg: Msg) -> object:
        try:
            req = msgspec.json.decode(msg.data, type=TaskRequest)
        except msgspec.DecodeError as exc:
            return _invalid("invalid task request", str(exc))
        headers = msg.headers or {}
        # The original service's publishers send no requester: the header, else the owner, else
        # "nats" stands for whoever asked.
        requester = req.requester or headers.get(AGENT_ID_HEADER) or req.owner or "nats"
        if not _AGENT_ID.match(requester) or requester in {".", ".."}:
            return _invalid(
                "requester (or header X-Agent-ID, or owner) must be 1-128 characters of "
                "[A-Za-z0-9._:@/-]",
                {"field": "requester"},
            )
        new = new_task(req)
        key = req.idempotency_key or headers.get(IDEMPOTENCY_HEADER)
        task, _created = await self.broker.submit(new, requester=requester, idempotency_key=key)
        return task

    async def _on_report(self, msg: Msg) -> object:
        _, _, raw_id, kind = msg.subject.split(".", 3)
        try:
            task_id = uuid.UUID(raw_id)
        except ValueError:
            return ErrorReply(error=f"task {raw_id} not found", status=404)
        try:
            report = msgspec.json.decode(msg.data, type=_REPORT_TYPES[kind])
        except msgspec.DecodeError as exc:
            return _invalid(f"invalid {kind} report", str(exc))
        task: Task
        match report:
            case StartedReport():
                task = await self.broker.start(task_id, report.agent_id)
            case ProgressReport():
                fields = progress_fields(
                    report.percent, report.message, report.data, report.progress, report.detail
                )
                task = await self.broker.progress(
                    task_id, report.agent_id, percent=fields.percent, message=fields.message,
                    data=fields.data,
                )
            case CompletedReport():
                task = await self.broker.complete(task_id, report.agent_id, report.result)
            case FailedReport():
                task = await self.broker.fail(
                    task_id, report.agent_id, report.error, retry_eligible=report.retry_eligible
                )
        return task

    async def _on_agent(self, msg: Msg) -> object:
        # swarm.agent.<agent id, which may itself contain dots>.<state>
        parts = msg.subject.split(".")
        agent_id, state = ".".join(parts[2:-1]), parts[-1]
        if not _AGENT_ID.match(agent_id):
            return _invalid(f"invalid agent id {agent_id!r}", {"field": "agent_id"})
        try:
            status = AgentStatus(state)
        except ValueError:
            return _invalid(
                f"unknown agent state {state!r}", {"allowed": [str(s) for s in AgentStatus]}
            )
        body = AgentAnnouncement()
        if msg.data.strip():
            try:
                body = msgspec.json.decode(msg.data, type=AgentAnnouncement)
            except msgspec.DecodeError as exc:
                return _invalid("invalid agent announcement", str(exc))
        if status is AgentStatus.STOPPED:
            try:
                reassigned = await self.store.agent_stop(agent_id)
            except NotFound:
                await self.store.agent_upsert(agent_id, status=status)
                reassigned = 0
            if reassigned:
                log.info("agent %s stopped: %d task(s) back to pending", agent_id, reassigned)
            return await self.store.agent_get(agent_id)
        if body.capabilities is not None or body.owner is not None or body.max_concurrent:
            return await self.store.agent_upsert(
                agent_id, capabilities=body.capabilities, owner=body.owner,
                max_concurrent=body.max_concurrent, status=status,
            )
        try:
            return await self.store.agent_heartbeat(agent_id, status)
        except NotFound:
            return await self.store.agent_upsert(agent_id, status=status)
