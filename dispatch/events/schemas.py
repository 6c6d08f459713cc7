"""What travels over NATS: subjects, headers and message bodies, inbound and outbound."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

import msgspec

from dispatch import wire
from dispatch.models import OnFailure, Task
from dispatch.wire import Source, TaskCreate

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
# swarm.task.<id>.<kind>: an agent's reports, then what a requester, an owner or another system
# decides about a task (the REST endpoints of the same names).
REPORT_KINDS = (
    "started", "progress", "completed", "failed", "suspended", "signal",
    "approve", "reject", "accept", "request-changes", "depend", "undepend",
)
SUBJECT_AGENT = "swarm.agent.>"


class EventMessage(msgspec.Struct, frozen=True, kw_only=True):
    """What every event message starts with. The event row's own payload fields (see the README,
    "Events (NATS)") follow at the top level of the same JSON object. `task` is the task as it is
    when the relay publishes (so a late `created` may already show it running); it is null, with
    `truncated` true, when the message would exceed the server's max_payload or the stream's
    max_msg_size (then the payload fields are dropped too, if need be)."""

    event: str
    task_id: uuid.UUID
    event_id: int
    at: datetime
    actor: str
    task: Task | None
    truncated: bool = False


class TaskRequest(TaskCreate, kw_only=True):
    """Body of swarm.task.request: the REST create body, plus who asks and an idempotency key
    (also accepted as the headers X-Agent-ID and Idempotency-Key)."""

    requester: str | None = None
    idempotency_key: str | None = None
    source: Source = "nats"


class StartedReport(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    agent_id: str
    lease: wire.Lease | None = None


class ProgressReport(wire.ProgressReport, kw_only=True):
    """The REST progress body (ours or the original service's shape) and who reports."""

    agent_id: str


class CompletedReport(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    agent_id: str
    result: dict[str, object] | None = None
    lease: wire.Lease | None = None


class FailedReport(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    agent_id: str
    error: str | None = None
    retry_eligible: bool = True
    lease: wire.Lease | None = None


class SuspendedReport(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """swarm.task.<id>.suspended: the agent sets its running task aside until a signal."""

    agent_id: str
    waiting_for: Annotated[str, msgspec.Meta(min_length=1, max_length=65536)]
    timeout_seconds: Annotated[int, msgspec.Meta(ge=1, le=31_536_000)]
    lease: wire.Lease | None = None


class SignalReport(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """swarm.task.<id>.signal: what a suspended task waits for has come, from `sender` (its
    requester, its owner or an agent that held it)."""

    sender: str
    payload: object = None


class DecisionMessage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """swarm.task.<id>.approve|reject|accept: a gate's decision, from `sender` (the task's
    requester or its owner); reject's reason is recorded."""

    sender: str
    reason: wire.LongText | None = None


class ChangesMessage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """swarm.task.<id>.request-changes: the result in review does not stand."""

    sender: str
    feedback: Annotated[str, msgspec.Meta(min_length=1, max_length=65536, pattern=wire.NO_NUL)]


class DependMessage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """swarm.task.<id>.depend: the waiting task's requester makes it wait for another task."""

    sender: str
    depends_on: uuid.UUID
    on_failure: OnFailure = "cancel"


class UndependMessage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """swarm.task.<id>.undepend: the waiting task's requester removes an edge."""

    sender: str
    depends_on: uuid.UUID


Report = (StartedReport | ProgressReport | CompletedReport | FailedReport | SuspendedReport
          | SignalReport | DecisionMessage | ChangesMessage | DependMessage | UndependMessage)
REPORT_TYPES: dict[str, type[Report]] = {
    "started": StartedReport,
    "progress": ProgressReport,
    "completed": CompletedReport,
    "failed": FailedReport,
    "suspended": SuspendedReport,
    "signal": SignalReport,
    "approve": DecisionMessage,
    "reject": DecisionMessage,
    "accept": DecisionMessage,
    "request-changes": ChangesMessage,
    "depend": DependMessage,
    "undepend": UndependMessage,
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
