"""What REST and NATS share on the way in: a create request in the original service's vocabulary
(with its aliases) becomes a NewTask."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import NamedTuple, Protocol

from dispatch.errors import InvalidInput
from dispatch.models import NewTask


class CreateRequest(Protocol):
    """The fields of a task request; `scope` aliases one capability, `context` the metadata."""

    @property
    def title(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def owner(self) -> str | None: ...
    @property
    def required_capabilities(self) -> list[str] | None: ...
    @property
    def scope(self) -> str | None: ...
    @property
    def priority(self) -> int: ...
    @property
    def timeout_seconds(self) -> int | None: ...
    @property
    def heartbeat_seconds(self) -> int | None: ...
    @property
    def max_retries(self) -> int: ...
    @property
    def metadata(self) -> dict[str, object] | None: ...
    @property
    def context(self) -> dict[str, object] | None: ...
    @property
    def parent_task_id(self) -> uuid.UUID | None: ...
    @property
    def available_at(self) -> datetime | None: ...
    @property
    def source(self) -> str: ...


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
        percent = progress * 100 if progress <= 1 else progress
    if detail is not None:
        if isinstance(detail, str):
            one_of(message, detail, ("message", "detail"))
            message = detail
        else:
            one_of(data, detail, ("data", "detail"))
            data = detail
    return ProgressFields(percent, message, data)


def new_task(req: CreateRequest) -> NewTask:
    """The NewTask a create request asks for; InvalidInput when a field and its alias clash."""
    one_of(req.required_capabilities, req.scope, ("required_capabilities", "scope"))
    one_of(req.metadata, req.context, ("metadata", "context"))
    caps = req.required_capabilities
    if caps is None:
        caps = [req.scope] if req.scope is not None else []
    return NewTask(
        title=req.title,
        description=req.description,
        owner=req.owner,
        required_capabilities=caps,
        priority=req.priority,
        timeout_seconds=req.timeout_seconds,
        heartbeat_seconds=req.heartbeat_seconds,
        max_retries=req.max_retries,
        metadata=req.metadata if req.metadata is not None else (req.context or {}),
        parent_task_id=req.parent_task_id,
        available_at=req.available_at,
        source=req.source,
    )
