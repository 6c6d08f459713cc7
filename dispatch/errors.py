"""The one error hierarchy. Only dispatch.api knows which HTTP status each maps to."""

from __future__ import annotations


class DispatchError(Exception):
    """Base of every error Dispatch raises on purpose."""

    def __init__(self, message: str, *, detail: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class InvalidInput(DispatchError):
    """The caller sent something that cannot be accepted; `field` names it when known."""

    def __init__(self, message: str, *, field: str | None = None, detail: object = None) -> None:
        super().__init__(message, detail=detail)
        self.field = field


class NotFound(DispatchError):
    """No such task or agent."""


class Forbidden(DispatchError):
    """The actor may not do this to this task."""


class Unauthorized(DispatchError):
    """Missing or malformed credentials."""


class Conflict(DispatchError):
    """The task is not in a state that allows the change; `task` is its current state."""

    def __init__(self, message: str, *, task: object = None) -> None:
        super().__init__(message)
        self.task = task


class Unavailable(DispatchError):
    """A dependency (the database) cannot be reached."""


class ConfigError(DispatchError):
    """A configuration value is invalid; the message names the key."""


class MigrationError(DispatchError):
    """The schema cannot be brought to this code's version."""
