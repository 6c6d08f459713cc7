"""Litestar exception handlers: each error answers with its own status (dispatch.errors).

Every failure leaves as `{"error": "<message>", "detail": ...}`.
"""

import difflib
import logging
import re
import typing
from typing import Any

import msgspec
import psycopg
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)
from litestar.types import ExceptionHandlersMap
from psycopg_pool import PoolTimeout

from dispatch.api.deps import Caller
from dispatch.errors import (
    Conflict,
    DispatchError,
    InvalidInput,
    NotFound,
    Unauthorized,
    Unavailable,
)
from dispatch.models import Task
from dispatch.wire import ErrorBody, error_path

log = logging.getLogger(__name__)

_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]*)`")


# OpenAPI: what every operation may answer besides success (all with ErrorBody).
ERRORS: dict[int, ResponseSpec] = {
    status: ResponseSpec(data_container=ErrorBody, description=description)
    for status, description in (
        (400, "Bad input: `detail.field` names it"),
        (401, "Missing or malformed X-Agent-ID, or no token where one is needed"),
        (403, "Not allowed for this caller, or a wrong, revoked or another agent's token"),
        (404, "Unknown task or agent, or (auth.mode tokens) a task the caller may not see"),
        (409, "The task's state forbids this: `detail` is the task as it is now"),
        (413, "Body over server.max_body_bytes"),
        (415, "A body that is not JSON (Content-Type: application/json)"),
        (
            503,
            "The database is out of reach, or busy (a row locked past database.lock_timeout_ms, "
            "a statement past database.statement_timeout_ms, no free pooled connection): retry "
            "after the Retry-After header's seconds",
        ),
    )
}


def error_response(
    status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None
) -> Response[ErrorBody]:
    return Response(ErrorBody(error=error, detail=detail), status_code=status, headers=headers)


def dispatch_error(request: Request[Any, Any, Any], exc: DispatchError) -> Response[ErrorBody]:
    task = getattr(exc, "task", None)  # the task a refused or conflicting change was about
    caller: Caller | None = request.state.get("dispatch_caller")
    if isinstance(task, Task) and caller is not None and not caller.sees(task):
        # auth.mode tokens: whether a task the caller may not see exists is none of its business.
        exc = NotFound(f"task {task.task_id} not found")
    status = exc.status
    headers = None
    detail: Any = exc.detail
    if isinstance(exc, InvalidInput):
        detail = {"field": exc.field} if exc.detail is None else exc.detail
    elif isinstance(exc, Conflict):
        detail = exc.task
    elif isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"} if exc.detail == "admin" else None
        detail = None
    elif isinstance(exc, Unavailable):
        headers = {"Retry-After": str(exc.retry_after)}
        detail = {**(exc.detail if isinstance(exc.detail, dict) else {}),
                  "retry_after": exc.retry_after}
        log.warning("request failed: %s", exc.message, extra={"path": request.url.path})
        return error_response(status, exc.message, detail, headers)
    if status >= HTTP_500_INTERNAL_SERVER_ERROR:
        log.error("request failed: %s", exc.message, extra={"path": request.url.path})
    return error_response(status, exc.message, detail, headers)


def validation_error(
    request: Request[Any, Any, Any], exc: ValidationException
) -> Response[ErrorBody]:
    """Litestar's parameter/body validation: name the field in the message and the detail."""
    problems = exc.extra if isinstance(exc.extra, list) else []
    if not problems:
        return error_response(HTTP_400_BAD_REQUEST, f"invalid request: {exc.detail}")
    first = problems[0] if isinstance(problems[0], dict) else {}
    message = str(first.get("message", exc.detail))
    field = str(first.get("key") or "")
    raw_source = first.get("source")
    source = str(getattr(raw_source, "value", raw_source) or "")  # ParamType.QUERY -> "query"
    if source == "body":
        unknown = _UNKNOWN_FIELD.search(message)
        at_path = error_path(message)
        if unknown:
            field = f"{at_path}.{unknown.group(1)}" if at_path is not None else unknown.group(1)
            close = difflib.get_close_matches(unknown.group(1), _body_fields(request), n=1)
            if close:
                message += f" (did you mean `{close[0]}`?)"
        elif at_path is not None:
            field = at_path
        elif field == "data":
            field = ""
    where = f" {field}" if field else ""
    return error_response(
        HTTP_400_BAD_REQUEST,
        f"invalid {source or 'input'}{where}: {message}",
        {"field": field or None, "source": source or None},
    )


def _body_fields(request: Request[Any, Any, Any]) -> list[str]:
    """The field names of the request bodies the handler takes (for a likely-fix hint)."""
    data = request.route_handler.parsed_fn_signature.parameters.get("data")
    names: list[str] = []
    todo: list[object] = [data.annotation] if data is not None else []
    while todo:
        kind = todo.pop()
        if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
            names.extend(f.encode_name for f in msgspec.structs.fields(kind))
        else:
            todo.extend(typing.get_args(kind))
    return names


def http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorBody]:
    """Routing, method, size and parsing errors raised by Litestar itself."""
    status = exc.status_code
    message = exc.detail
    if status == HTTP_400_BAD_REQUEST and message == "Input data was truncated":
        message = "malformed JSON body"
    elif status == 413:
        # The limit in the answer: a client can say why its report was refused (the SDK puts it
        # in the failure it reports instead).
        limit = request.route_handler.resolve_request_max_body_size()
        message = "request body too large" + (f" (limit {limit} bytes)" if limit else "")
        return error_response(status, message, {"limit_bytes": limit}, exc.headers)
    return error_response(status, message, None, exc.headers)


def database_unreachable(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    """A pool or connection failure that reached the app without passing through dispatch.db
    (which turns them into Unavailable): answered the same way."""
    log.warning("database unavailable: %s", exc, extra={"path": request.url.path})
    return error_response(
        HTTP_503_SERVICE_UNAVAILABLE, "database unavailable", {"retry_after": 1},
        {"Retry-After": "1"},
    )


def too_deep(request: Request[Any, Any, Any], exc: RecursionError) -> Response[ErrorBody]:
    """msgspec refuses JSON nested deeper than Python's recursion limit."""
    return error_response(HTTP_400_BAD_REQUEST, "JSON nested too deeply", {"field": None})


def internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    log.exception("unhandled error", extra={"path": request.url.path}, exc_info=exc)
    return error_response(HTTP_500_INTERNAL_SERVER_ERROR, "internal server error")


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    DispatchError: dispatch_error,  # type: ignore[dict-item]
    ValidationException: validation_error,  # type: ignore[dict-item]
    HTTPException: http_error,  # type: ignore[dict-item]
    PoolTimeout: database_unreachable,
    psycopg.OperationalError: database_unreachable,
    RecursionError: too_deep,  # type: ignore[dict-item]
    Exception: internal_error,
}
