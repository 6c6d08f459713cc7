"""The inbound subscriptions (queue group `dispatch`): task requests, agent reports and agent
announcements, each answered on the message's reply subject."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from dispatch.broker import Broker
from dispatch.errors import Conflict, DispatchError, InvalidInput, NotFound, Unavailable
from dispatch.events.connection import NatsConnection
from dispatch.events.schemas import (
    AGENT_ID_HEADER,
    IDEMPOTENCY_HEADER,
    ORIGIN_HEADER,
    ORIGIN_INBOUND,
    ORIGIN_RELAY,
    QUEUE_GROUP,
    REPORT_KINDS,
    REPORT_TYPES,
    SUBJECT_AGENT,
    SUBJECT_REQUEST,
    AgentAnnouncement,
    ChangesMessage,
    CompletedReport,
    DecisionMessage,
    DependMessage,
    ErrorReply,
    FailedReport,
    ProgressReport,
    SignalReport,
    StartedReport,
    SuspendedReport,
    TaskRequest,
    UndependMessage,
)
from dispatch.models import (
    Accept,
    AgentStatus,
    Approve,
    Change,
    Complete,
    Depend,
    Fail,
    Progress,
    Reject,
    RequestChanges,
    Signal,
    Start,
    Suspend,
    Undepend,
)
from dispatch.wire import AGENT_ID_RE, error_path, new_task, progress_fields

log = logging.getLogger(__name__)

# How long a message is retried while the database is busy or out of reach (a locked row, a
# restart) before the 503 goes to its reply subject. Core NATS does not redeliver: a report that is
# answered 503 and has no reply subject is lost, so it is retried here; the subscription handles
# the next message only afterwards, which keeps each subject's messages in order.
RETRY_SECONDS = 30.0


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
    swarm.task.request, swarm.task.<id>.<kind> for each of REPORT_KINDS and swarm.agent.>.
    Each subscription handles its messages one at a time, in arrival order; every outcome goes to
    the reply subject when the message has one."""

    def __init__(self, nats_conn: NatsConnection, broker: Broker) -> None:
        self.nats = nats_conn
        self.broker = broker
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
                reply = await self._retrying(handler, msg)
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

    async def _retrying(self, handler: _Handler, msg: Msg) -> object:
        """handler(msg), again after a 503 while that is safe: always when nothing was done (a
        lock or statement timeout, no free connection); after a broken connection only for what
        is safe to apply twice (a report, an announcement, a request with an idempotency key)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETRY_SECONDS
        delay = 0.1
        while True:
            try:
                return await handler(msg)
            except Unavailable as exc:
                if not (exc.nothing_done or self._repeatable(msg)):
                    raise
                if loop.time() + delay > deadline:
                    raise
                log.info("NATS %s: %s; retrying in %.1fs", msg.subject, exc.message, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    @staticmethod
    def _repeatable(msg: Msg) -> bool:
        if msg.subject != SUBJECT_REQUEST:
            return True  # a repeated report or announcement is answered like a repeat
        if (msg.headers or {}).get(IDEMPOTENCY_HEADER):
            return True
        try:
            return bool(msgspec.json.decode(msg.data, type=TaskRequest).idempotency_key)
        except msgspec.DecodeError:
            return False

    async def _on_request(self, msg: Msg) -> object:
        try:
            req = msgspec.json.decode(msg.data, type=TaskRequest)
        except msgspec.DecodeError as exc:
            field = error_path(str(exc))
            return _invalid("invalid task request", str(exc) if field is None else {"field": field})
        headers = msg.headers or {}
        # The original service's publishers send no requester: the header, else the owner, else
        # "nats" stands for whoever asked.
        requester = req.requester or headers.get(AGENT_ID_HEADER) or req.owner or "nats"
        if not AGENT_ID_RE.match(requester):
            return _invalid(
                "requester (or header X-Agent-ID, or owner) must be 1-128 characters of "
                "[A-Za-z0-9._:@/-]",
                {"field": "requester"},
            )
        new = new_task(req)
        key = req.idempotency_key or headers.get(IDEMPOTENCY_HEADER)
        task, _created = await self.broker.submit(
            new, requester=requester, idempotency_key=key, trace_parent=headers
        )
        return task

    async def _on_report(self, msg: Msg) -> object:
        _, _, raw_id, kind = msg.subject.split(".", 3)
        try:
            task_id = uuid.UUID(raw_id)
        except ValueError:
            return ErrorReply(error=f"task {raw_id} not found", status=404)
        try:
            report = msgspec.json.decode(msg.data, type=REPORT_TYPES[kind])
        except msgspec.DecodeError as exc:
            return _invalid(f"invalid {kind} report", str(exc))
        change: Change
        match report:
            case StartedReport():
                change = Start(task_id=task_id, agent_id=report.agent_id, lease=report.lease)
            case ProgressReport():
                fields = progress_fields(
                    report.percent, report.message, report.data, report.progress, report.detail
                )
                change = Progress(
                    task_id=task_id, agent_id=report.agent_id, percent=fields.percent,
                    message=fields.message, data=fields.data, lease=report.lease,
                )
            case CompletedReport():
                change = Complete(
                    task_id=task_id, actor=report.agent_id, result=report.result,
                    lease=report.lease,
                )
            case FailedReport():
                change = Fail(
                    task_id=task_id, agent_id=report.agent_id, error=report.error,
                    retry_eligible=report.retry_eligible, lease=report.lease,
                )
            case SuspendedReport():
                change = Suspend(
                    task_id=task_id, agent_id=report.agent_id, waiting_for=report.waiting_for,
                    timeout_seconds=report.timeout_seconds, lease=report.lease,
                )
            case SignalReport():
                change = Signal(task_id=task_id, actor=report.sender, payload=report.payload)
            case DecisionMessage() if kind == "approve":
                change = Approve(task_id=task_id, actor=report.sender)
            case DecisionMessage() if kind == "reject":
                change = Reject(task_id=task_id, actor=report.sender, reason=report.reason)
            case DecisionMessage():
                change = Accept(task_id=task_id, actor=report.sender)
            case ChangesMessage():
                change = RequestChanges(
                    task_id=task_id, actor=report.sender, feedback=report.feedback
                )
            case DependMessage():
                change = Depend(
                    task_id=task_id, depends_on=report.depends_on, actor=report.sender,
                    on_failure=report.on_failure,
                )
            case UndependMessage():
                change = Undepend(
                    task_id=task_id, depends_on=report.depends_on, actor=report.sender
                )
        return await self.broker.apply(change)

    async def _on_agent(self, msg: Msg) -> object:
        # swarm.agent.<agent id, which may itself contain dots>.<state>
        parts = msg.subject.split(".")
        agent_id, state = ".".join(parts[2:-1]), parts[-1]
        if not AGENT_ID_RE.match(agent_id):
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
        if body.owner is not None:
            # As over REST: ownership decides whose tasks an agent gets, so an agent never sets
            # its own; an admin (REST) or the directory (Alexandria) does.
            return ErrorReply(
                error="owner is set by an admin or the directory (Alexandria), not by the agent",
                status=403,
                detail={"field": "owner"},
            )
        if status is AgentStatus.STOPPED:
            try:
                reassigned = await self.broker.agents.stop(agent_id)
            except NotFound:
                await self.broker.agents.upsert(agent_id, status=status)
                reassigned = 0
            if reassigned:
                log.info("agent %s stopped: %d task(s) back to pending", agent_id, reassigned)
            return await self.broker.agents.get(agent_id)
        if body.capabilities is not None or body.max_concurrent:
            return await self.broker.agents.upsert(
                agent_id, capabilities=body.capabilities,
                max_concurrent=body.max_concurrent, status=status,
            )
        try:
            return await self.broker.agents.heartbeat(agent_id, status)
        except NotFound:
            return await self.broker.agents.upsert(agent_id, status=status)
