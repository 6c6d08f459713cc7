"""Wire structs of the REST API: request bodies (strict) and the error body.

Responses reuse the domain structs of dispatch.models, whose field names are the wire names.
No `from __future__ import annotations`: Litestar reads these annotations at runtime.
"""

import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from dispatch.models import AgentStatus

# PostgreSQL text cannot hold NUL; rejecting it here keeps it a 400 instead of a driver error.
_NO_NUL = r"^[^\x00]*$"
AGENT_ID_PATTERN = r"^[A-Za-z0-9._:@/-]{1,128}$"
AGENT_ID_RE = re.compile(AGENT_ID_PATTERN)

Text = Annotated[str, msgspec.Meta(pattern=_NO_NUL)]
ShortText = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=_NO_NUL)]
Title = Annotated[str, msgspec.Meta(min_length=1, max_length=500, pattern=_NO_NUL)]
Description = Annotated[str, msgspec.Meta(max_length=65536, pattern=_NO_NUL)]
LongText = Annotated[str, msgspec.Meta(max_length=65536, pattern=_NO_NUL)]
Capability = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=_NO_NUL)]
Capabilities = Annotated[list[Capability], msgspec.Meta(max_length=64)]
Priority = Annotated[int, msgspec.Meta(ge=0, le=10)]
Seconds = Annotated[int, msgspec.Meta(ge=1, le=2_147_483_647)]
MaxRetries = Annotated[int, msgspec.Meta(ge=0, le=100)]
MaxConcurrent = Annotated[int, msgspec.Meta(ge=1, le=1000)]
Percent = Annotated[float, msgspec.Meta(ge=0, le=100)]
WaitSeconds = Annotated[float, msgspec.Meta(ge=0, le=30)]
Source = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=_NO_NUL)]
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]
JsonObject = dict[str, Any]


class _Body(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Request bodies reject unknown fields (SPEC section 5)."""


class TaskCreate(_Body):
    """POST /api/v1/tasks. `scope` is the original service's single capability, `context` its
    name for metadata."""

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


class TaskPatch(_Body):
    """PATCH /api/v1/tasks/{id}: cancel, merge-patch the metadata, or re-prioritise."""

    status: Literal["cancelled"] | None = None
    reason: LongText | None = None
    metadata: JsonObject | None = None
    context: JsonObject | None = None
    priority: Priority | None = None


class ClaimRequest(_Body):
    """POST /api/v1/tasks/claim: None capabilities means the agent's registered ones."""

    capabilities: Capabilities | None = None
    wait_seconds: WaitSeconds = 0


class ProgressReport(_Body):
    """Ours: percent, message, data. The original service's: progress (a fraction up to 1, else a
    percentage) and detail (a string is the message, anything else the data)."""

    percent: Percent | None = None
    message: LongText | None = None
    data: Any = None
    progress: Percent | None = None
    detail: Any = None


class CompleteReport(_Body):
    result: Any = None


class FailReport(_Body):
    error: LongText | None = None
    retry_eligible: bool = True


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
