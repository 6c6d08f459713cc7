"""The one error hierarchy. Each class carries the HTTP status it answers with; the API, the NATS
error reply and the client all read it from here."""

from __future__ import annotations


class DispatchError(Exception):
    """Base of every error Dispatch raises on purpose."""

    status = 500

    def __init__(self, message: str, *, detail: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class InvalidInput(DispatchError):
    """The caller sent something that cannot be accepted; `field` names it when known."""

    status = 400

    def __init__(self, message: str, *, field: str | None = None, detail: object = None) -> None:
        super().__init__(message, detail=detail)
        self.field = field


class NotFound(DispatchError):
    """No such task or agent (`task`: looked up again after a refused report, always None)."""

    status = 404
    task: object = None


class Forbidden(DispatchError):
    """The actor may not do this to this task; `task`, when known, is the task (never sent back:
    it decides whether the caller may even learn that the task exists)."""

    status = 403
    task: object = None


class Unauthorized(DispatchError):
    """Missing or malformed credentials."""

    status = 401


class UnsupportedMediaType(DispatchError):
    """A request body that is not JSON."""

    status = 415


class Conflict(DispatchError):
    """The task is not in a state that allows the change; `task` is its current state."""

    status = 409

    def __init__(self, message: str, *, task: object = None) -> None:
        super().__init__(message)
        self.task = task


class Unavailable(DispatchError):
    """The database cannot serve the request now: out of reach, or busy (a row locked by another
    session past lock_timeout, a statement past statement_timeout, no free pooled connection).
    Clients retry after `retry_after` seconds. `nothing_done` is True when the change certainly
    did not happen (busy); False when the connection broke mid-request and it may have."""

    status = 503

    def __init__(
        self, message: str, *, retry_after: int = 1, nothing_done: bool = False,
        detail: object = None,
    ) -> None:
        super().__init__(message, detail=detail)
        self.retry_after = retry_after
        self.nothing_done = nothing_done


class ConfigError(DispatchError):
    """A configuration value is invalid; the message names the key."""


class MigrationError(DispatchError):
    """The schema cannot be brought to this code's version."""


def error_for_status(status: int) -> type[DispatchError] | None:
    """The error class that answers with `status`; None when no class claims it."""
    for kind in DispatchError.__subclasses__():
        if vars(kind).get("status") == status:
            return kind
    return None
