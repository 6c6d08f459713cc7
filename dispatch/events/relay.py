"""The event relay: publishes the unpublished rows of the event log (the
transactional outbox dispatch.task_events) to NATS JetStream, then marks them published.

One batch is one transaction: take the relay's advisory lock (one replica relays at a time; the
others stand by), lock the oldest unpublished rows, publish each with `Nats-Msg-Id: <event id>.<its
created_at in microseconds>` (msg_id) and wait for JetStream's acks, mark the acked rows, commit. A
crash between publish and mark rolls the marks back, and the rows go out again under the same
message ids, which JetStream drops as duplicates within the stream's duplicate window. An ack that
says duplicate is checked against what the stream holds: another event under the same id is
published again under a new one (verify_duplicate). The relay wakes on NOTIFY dispatch_events
(polling is only a fallback) and, while NATS is down, on reconnection. While tracing is on, a
batch is a span and each message carries its task's trace context (traceparent)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import msgspec
from nats.errors import Error as NatsError
from nats.js import api as js_api
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, BadRequestError, NotFoundError

from dispatch.broker import Broker
from dispatch.errors import DispatchError
from dispatch.events.connection import NatsConnection
from dispatch.events.schemas import ORIGIN_HEADER, ORIGIN_RELAY, EventMessage
from dispatch.loop import BackgroundLoop
from dispatch.metrics import Metrics
from dispatch.models import Task, TaskEvent
from dispatch.notify import EVENTS_CHANNEL, Listener
from dispatch.tracing import NOOP

if TYPE_CHECKING:
    from dispatch.tracing import Tracing

log = logging.getLogger(__name__)

STREAM = "DISPATCH_EVENTS"
# Not swarm.task.>: that would also capture swarm.task.request, and
# JetStream acknowledges every message it stores that has a reply subject, so a requester's
# request would get the stream's PubAck instead of its task. swarm.task.*.* holds every event
# subject (swarm.task.<task id>.<event>) and leaves the 3-token request subject alone.
STREAM_SUBJECTS = ("swarm.task.*.*", "swarm.dispatch.>")
# How long JetStream remembers message ids: a relay that crashed after publishing and before
# marking must be replaced within this window for its re-publish to be dropped as a duplicate.
DUPLICATE_WINDOW_SECONDS = 120.0
MSG_ID_HEADER = "Nats-Msg-Id"
# An event JetStream refuses (an error, or no ack: an oversized message gets none) this many times,
# while it accepts other events, is set aside (marked with the reason in task_events.relay_error)
# so that it cannot hold up the events behind it. An outage or a full stream refuses everything and
# sets nothing aside.
REFUSALS_BEFORE_SET_ASIDE = 3
# A message JetStream calls a duplicate but that is not the event it was sent for goes out again
# under `<message id>+1`, then +2 ..., up to this many times (each is checked the same way).
CONFLICT_RETRIES = 3
# Room kept under the stream's max_msg_size for the message's headers (JetStream counts them):
# "NATS/1.0", the message id and the origin header need well under this.
HEADER_ROOM = 256


_ENVELOPE_KEYS = frozenset(EventMessage.__struct_fields__)
# What names the event in a message body; the rest (the task snapshot, truncated) is read or sized
# when the relay publishes, so a re-publish of the same event may differ there.
_IDENTITY_KEYS = ("event", "task_id", "event_id", "at", "actor")
_encoder = msgspec.json.Encoder()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def msg_id(event: TaskEvent) -> str:
    """The event's Nats-Msg-Id, `<id>.<created_at in microseconds since the epoch>`. The id alone
    repeats across a failover: a standby promoted behind its primary hands out again the ids of the
    WAL it never got, which the old primary's relay had already published, and JetStream would drop
    the new events as duplicates. A re-issued id comes with a later created_at; one row always gets
    the same message id, so its re-publish after a crash is still dropped."""
    return f"{event.id}.{(event.created_at - _EPOCH) // timedelta(microseconds=1)}"


def task_subject(event: TaskEvent) -> str:
    return f"swarm.task.{event.task_id}.{event.event}"


def agent_subject(agent_id: str) -> str:
    return f"swarm.dispatch.agent.{agent_id}.assigned"


def encode_event(event: TaskEvent, task: Task | None, max_payload: int) -> bytes:
    """The message body: envelope first, then the event's payload fields."""
    payload = {k: v for k, v in event.payload.items() if k not in _ENVELOPE_KEYS}
    for with_task, with_payload in ((True, True), (False, True), (False, False)):
        envelope = EventMessage(
            event=event.event, task_id=event.task_id, event_id=event.id, at=event.created_at,
            actor=event.actor, task=task if with_task else None,
            truncated=not (with_task and with_payload) and task is not None,
        )
        body = _encoder.encode(envelope)
        if with_payload and payload:
            body = body[:-1] + b"," + _encoder.encode(payload)[1:]
        if len(body) <= max_payload:
            return body
    return body


@dataclasses.dataclass
class Outgoing:
    """One NATS message of one event."""

    event_id: int
    subject: str
    msg_id: str
    body: bytes
    # The task's W3C trace context (traceparent, tracestate), sent while tracing is on.
    trace_context: Mapping[str, str] | None = None


def schedule_subject(schedule: str, what: str) -> str:
    return f"swarm.dispatch.schedule.{schedule}.{what}"


# A schedule's events also go to its own subject: swarm.dispatch.schedule.<name>.fired|skipped.
_SCHEDULE_EVENTS = {"schedule_fired": "fired", "schedule_skipped": "skipped"}


def messages(event: TaskEvent, task: Task | None, max_payload: int) -> list[Outgoing]:
    """An event's messages: its task subject, for an assignment also the agent's subject, for a
    schedule's fire or skip also the schedule's."""
    body = encode_event(event, task, max_payload)
    base = msg_id(event)
    trace = task.trace_context if task is not None else None
    out = [Outgoing(event.id, task_subject(event), base, body, trace)]
    agent = event.payload.get("assigned_agent")
    if event.event == "assigned" and isinstance(agent, str) and agent:
        out.append(Outgoing(event.id, agent_subject(agent), f"{base}:agent", body, trace))
    schedule = event.payload.get("schedule")
    if event.event in _SCHEDULE_EVENTS and isinstance(schedule, str) and schedule:
        subject = schedule_subject(schedule, _SCHEDULE_EVENTS[event.event])
        out.append(Outgoing(event.id, subject, f"{base}:schedule", body, trace))
    return out


def same_event(stored: js_api.RawStreamMsg, sent: Outgoing) -> bool:
    """Whether the stream's message is the event `sent` carries (on the same subject)."""
    if stored.subject != sent.subject or stored.data is None:
        return False
    if stored.data == sent.body:
        return True
    try:
        had, ours = msgspec.json.decode(stored.data), msgspec.json.decode(sent.body)
    except msgspec.DecodeError:
        return False
    return isinstance(had, dict) and all(had.get(k) == ours[k] for k in _IDENTITY_KEYS)


def waves(events: Sequence[TaskEvent]) -> list[list[TaskEvent]]:
    """Split a batch (in id order) so that no wave holds two events of one task: wave k holds each
    task's k-th event. A wave is published pipelined, the next only after all its acks, so an
    event never reaches the stream before an earlier event of its task, even when some publish
    fails halfway (the rest of that task then waits for the next batch)."""
    rank: dict[uuid.UUID, int] = defaultdict(int)
    out: list[list[TaskEvent]] = []
    for e in events:
        k = rank[e.task_id]
        rank[e.task_id] = k + 1
        if k == len(out):
            out.append([])
        out[k].append(e)
    return out


class PublishFailed(Exception):
    """Some messages of a batch got no JetStream ack."""


class Relay(BackgroundLoop):
    """The outbox relay loop. `published` counts events this relay marked."""

    name = "event_relay"
    # Failures that mean NATS or the database is out of reach for now (not a bug).
    EXPECTED = (PublishFailed, NatsError, DispatchError, OSError, TimeoutError)

    def __init__(
        self,
        broker: Broker,
        listener: Listener,
        nats_conn: NatsConnection,
        *,
        metrics: Metrics | None = None,
        batch_size: int = 500,
        poll_interval: float = 5.0,
        publish_timeout: float = 5.0,
        tracing: Tracing | None = None,
    ) -> None:
        super().__init__(interval=poll_interval, backoff=(0.1, 5.0))
        self.tracing = tracing
        self.broker = broker
        self.listener = listener
        self.nats = nats_conn
        self.metrics = metrics
        self.batch_size = batch_size
        self.publish_timeout = publish_timeout
        self.published = 0
        self.set_aside = 0
        # Duplicate acks for the event that was sent (re-publishes), and for another message
        # under its id (conflicts: each published again under a new id).
        self.republished = 0
        self.conflicts = 0
        self._last_conflict: str | None = None
        self._last_set_aside: str | None = None
        # event id -> (refusals, self.published at the first refusal)
        self._refusals: dict[int, tuple[int, int]] = {}
        self._stream_ready = False
        # The stream's max_msg_size when an operator set one: bodies are sized to fit it.
        self._stream_max_msg: int | None = None
        self._woken = asyncio.Event()

    def health(self) -> dict[str, object]:
        """For /health: whether the last relay attempt worked (NATS itself is the connection's)."""
        report: dict[str, object] = (
            {"event_relay": "ok"}
            if self.last_error is None
            else {"event_relay": "failing", "event_relay_error": self.last_error}
        )
        if self.set_aside:
            report["events_set_aside"] = self.set_aside
            report["events_set_aside_last"] = self._last_set_aside
        if self.conflicts:
            report["event_id_conflicts"] = self.conflicts
            report["event_id_conflicts_last"] = self._last_conflict
        return report

    def _failed(self, n: int = 1) -> None:
        if self.metrics is not None:
            self.metrics.nats_publish_failures.inc(n)

    def arm(self) -> None:
        self._woken = self.listener.event(EVENTS_CHANNEL)

    async def start(self) -> None:
        # New event rows NOTIFY only while a relay runs: tell the database one does.
        await self.broker.config.relay_running()
        await super().start()

    async def run_once(self) -> bool:
        """Make sure of the stream, then relay one batch; True when there may be more."""
        if not self._stream_ready:
            await self.ensure_stream()
        return await self.relay_once()

    async def round(self) -> float:
        while not self.nats.is_connected:
            # Events wait in the log. A wake-up with new events while NATS is down counts as a
            # failed publish, so the failure counter moves for as long as the outage matters.
            await _first(self.nats.connected.wait(), self._woken.wait(), timeout=self.interval)
            if self._woken.is_set() and not self.nats.is_connected:
                self._failed()
            self.arm()
        return 0.0 if await self.run_once() else self.interval

    def failed(self, exc: Exception, retry_in: float) -> str:
        if isinstance(exc, self.EXPECTED):
            log.warning("event relay: %s; retrying in %.1fs", exc, retry_in)
            self._stream_ready = False
            return str(exc)
        log.exception("event relay failed; retrying", exc_info=exc)  # a bug must not stop it
        return repr(exc)

    async def sleep(self, seconds: float) -> None:
        """Until NOTIFY dispatch_events, or seconds."""
        if seconds > 0:
            await _first(self._woken.wait(), timeout=seconds)

    async def sleep_after_failure(self, seconds: float) -> None:
        """Until the connection drops (the reconnection is what to wait for then), or seconds."""
        await _first(self.nats.disconnected.wait(), timeout=seconds)

    async def ensure_stream(self) -> None:
        """Create the stream DISPATCH_EVENTS, or bring an existing one's subjects and duplicate
        window to what the relay needs (its other settings, e.g. limits, are kept)."""
        js = self.nats.jetstream()
        wanted = js_api.StreamConfig(
            name=STREAM, subjects=list(STREAM_SUBJECTS), duplicate_window=DUPLICATE_WINDOW_SECONDS,
            storage=js_api.StorageType.FILE,
        )
        try:
            info = await js.stream_info(STREAM)
        except NotFoundError:
            try:
                await js.add_stream(wanted)
                log.info("created JetStream stream %s", STREAM)
                self._stream_max_msg = None
                self._stream_ready = True
                return
            except BadRequestError:  # another replica created it just now
                info = await js.stream_info(STREAM)
        config = info.config
        # Read again after every failed batch (ensure_stream runs then): an operator who lowers
        # the limit gets events that fit it, without their task snapshot if need be.
        limit = config.max_msg_size
        self._stream_max_msg = limit if limit is not None and limit > 0 else None
        if (
            sorted(config.subjects or []) != sorted(STREAM_SUBJECTS)
            or config.duplicate_window < DUPLICATE_WINDOW_SECONDS
        ):
            await js.update_stream(
                dataclasses.replace(
                    config, subjects=list(STREAM_SUBJECTS),
                    duplicate_window=max(config.duplicate_window, DUPLICATE_WINDOW_SECONDS),
                )
            )
            log.info("updated JetStream stream %s", STREAM)
        self._stream_ready = True

    async def relay_once(self) -> bool:
        """Publish and mark one batch. True when there may be more to do right away."""
        # The transaction spans the publish on purpose (lock, publish, mark, commit).
        outbox = self.broker.outbox
        async with outbox.transaction() as conn:
            if not await outbox.relay_lock(conn=conn):
                return False  # another replica is relaying; its NOTIFY wake-ups are ours too
            events = await outbox.relay_batch(self.batch_size, conn=conn)
            if not events:
                return False
            tasks = await self.broker.tasks.by_id(list({e.task_id for e in events}), conn=conn)
            span = NOOP if self.tracing is None else self.tracing.span(
                "dispatch.relay", kind="producer", attributes={"dispatch.events": len(events)}
            )
            with span:
                acked, error = await self.publish(events, tasks)
            if acked:
                since = min(e.created_at for e in events)
                await outbox.mark_published(acked, since=since, conn=conn)
            aside = self._to_set_aside(len(acked))
            reason = f"refused by JetStream {REFUSALS_BEFORE_SET_ASIDE} times: {error}"
            if aside:
                await outbox.set_aside(aside, reason, conn=conn)
        self.published += len(acked)
        if aside:
            self._set_aside(aside, reason)
            return True  # what waited behind them goes out now
        if error is not None:
            raise error
        return len(events) == self.batch_size

    def _refused(self, event_id: int) -> None:
        count, since = self._refusals.get(event_id, (0, self.published))
        self._refusals[event_id] = (count + 1, since)

    def _to_set_aside(self, acked_now: int) -> list[int]:
        """Events refused often enough, while JetStream accepted others since their first refusal
        (so the refusal is theirs, not an outage or a full stream: those stop everything)."""
        published = self.published + acked_now
        return [
            event_id
            for event_id, (count, since) in self._refusals.items()
            if count >= REFUSALS_BEFORE_SET_ASIDE and published > since
        ]

    def _set_aside(self, ids: list[int], reason: str) -> None:
        for event_id in ids:
            self._refusals.pop(event_id, None)
        self.set_aside += len(ids)
        self._last_set_aside = f"events {ids}: {reason}"
        if self.metrics is not None:
            self.metrics.events_set_aside.inc(len(ids))
        log.error("event relay: set aside %s", self._last_set_aside)

    def headers(self, message: Outgoing) -> dict[str, str]:
        if self.tracing is not None and message.trace_context:
            return {**message.trace_context, MSG_ID_HEADER: message.msg_id,
                    ORIGIN_HEADER: ORIGIN_RELAY}
        return {MSG_ID_HEADER: message.msg_id, ORIGIN_HEADER: ORIGIN_RELAY}

    def _duplicate(self, verdict: str) -> None:
        if self.metrics is not None:
            self.metrics.event_duplicates.labels(verdict).inc()

    async def verify_duplicate(
        self, js: JetStreamContext, m: Outgoing, ack: js_api.PubAck
    ) -> str | None:
        """JetStream acknowledged m as a duplicate: read the message it holds under m's id (at the
        ack's sequence). The same event: a re-publish, nothing to do. Anything else (another
        event under the same id, or a message the stream no longer has): m goes out again under
        `<id>+1`, +2 ..., until it is stored. None when m is in the stream, else why not."""
        taken = m.msg_id
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                stored: js_api.RawStreamMsg | None = await js.get_msg(STREAM, ack.seq)
            except NotFoundError:
                stored = None
            if stored is not None and same_event(stored, m):
                if attempt == 0:
                    self.republished += 1
                    self._duplicate("same")
                return None
            if attempt == 0:
                self.conflicts += 1
                self._duplicate("conflict")
            if attempt == CONFLICT_RETRIES:
                break
            held = "nothing any more" if stored is None else repr(stored.subject)
            self._last_conflict = (
                f"event {m.event_id} ({m.subject}): message id {taken} was already taken by"
                f" stream sequence {ack.seq} ({held})"
            )
            taken = f"{m.msg_id}+{attempt + 1}"
            log.error("event relay: %s; publishing it again as %s", self._last_conflict, taken)
            again = dataclasses.replace(m, msg_id=taken)
            ack = await js.publish(m.subject, m.body, timeout=self.publish_timeout,
                                   headers=self.headers(again))
            if ack.stream != STREAM:
                return "an ack from another stream"
            if not ack.duplicate:
                return None
        return f"message ids {m.msg_id} to {taken} are all taken by other messages"

    async def publish(
        self, events: Sequence[TaskEvent], tasks: dict[uuid.UUID, Task]
    ) -> tuple[list[int], PublishFailed | None]:
        """Publish events wave by wave; the ids that JetStream acknowledged, and the failure that
        stopped the batch, if any."""
        nc = self.nats.nc
        assert nc is not None
        js = self.nats.jetstream()
        max_payload = nc.max_payload
        if self._stream_max_msg is not None:
            max_payload = min(max_payload, max(self._stream_max_msg - HEADER_ROOM, 0))
        acked: list[int] = []
        for wave in waves(events):
            pending: list[tuple[Outgoing, asyncio.Future[js_api.PubAck]]] = []
            try:
                for event in wave:
                    for m in messages(event, tasks.get(event.task_id), max_payload):
                        fut = await js.publish_async(m.subject, m.body, headers=self.headers(m))
                        pending.append((m, fut))
            except Exception as exc:  # not even sent (connection lost, too many in flight)
                for _, fut in pending:
                    fut.cancel()
                self._failed(len(wave))
                return acked, PublishFailed(f"publish failed: {exc!r}")
            _, late = await asyncio.wait([f for _, f in pending], timeout=self.publish_timeout)
            for fut in late:
                fut.cancel()
            failed: set[int] = set()
            problem: object = None
            for m, fut in pending:
                if fut.cancelled():
                    failed.add(m.event_id)
                    problem = problem or f"no ack within {self.publish_timeout}s"
                    self._refused(m.event_id)
                elif fut.exception() is not None or fut.result().stream != STREAM:
                    failed.add(m.event_id)
                    problem = problem or fut.exception() or "an ack from another stream"
                    if isinstance(fut.exception(), APIError):
                        self._refused(m.event_id)  # not another stream's ack: a config error
                elif fut.result().duplicate:
                    try:
                        why = await self.verify_duplicate(js, m, fut.result())
                    except (NatsError, TimeoutError) as exc:
                        why = f"checking a duplicate ack failed: {exc!r}"
                    if why is not None:
                        failed.add(m.event_id)
                        problem = problem or why
            acked.extend(e.id for e in wave if e.id not in failed)
            if failed:
                self._failed(len(failed))
                return acked, PublishFailed(
                    f"{len(failed)} event(s) got no JetStream ack (first: {problem})"
                )
        return acked, None


async def _first(*aws: Any, timeout: float) -> None:
    """Wait until the first of the awaitables finishes, or timeout; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
