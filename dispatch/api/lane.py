"""The hot endpoints' answer without the framework's per-request machinery.

An agent's lifecycle is a few requests per task (create, claim, complete or fail with `next`, a
batch of reports), and on those the framework's work around the handler (the before-request hook,
each parameter's model, the dependency, the body decoded a second time, the Response object and
its conversion) cost more CPU than the database call it wraps. A lane is a middleware on one such
route: after the router has matched it, the lane authenticates the caller and decodes the body
strictly, exactly as `content.admit` does, calls the same function as the route's handler and
sends the JSON itself.

It answers only what it takes as is. A body that does not decode strictly, or a header it would
have to validate the framework's way (`Fallback`), goes on to the route's own handler, which
answers as it always has (the body already read stays in the request's state for it). Errors raised
on the lane (401, 403, 404, 409, 413, 503, ...) are answered by the framework's exception
handlers, as the handler's would be, inside the metrics and tracing middleware (which count and
trace the status sent); the app's before-send hook adds the anti-framing headers to every answer.
"""

import re
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from litestar import Request

# The framework's own wrapper of a route's handler in its exception handlers (not exported): the
# lane's errors must be answered inside the metrics and tracing middleware, as the handler's are.
from litestar._asgi.utils import wrap_in_exception_handler
from litestar.types import ASGIApp, Receive, Scope, Send

from dispatch.api.auth import authenticate
from dispatch.api.content import decoder_of, require_json_body
from dispatch.api.deps import Caller

# A lane's answer: the status, what to send as JSON (None: no body), further headers.
Answer = tuple[int, object, dict[str, str] | None]
Run = Callable[[Caller, Any, Request[Any, Any, Any]], Awaitable[Answer]]

_JSON = [(b"content-type", b"application/json")]
_PLAIN_INT = re.compile(r"[1-9][0-9]{0,9}")


class Fallback(Exception):
    """Raised by a lane's run before it has done anything: the route's own handler answers."""


def lane(run: Run) -> Callable[[ASGIApp], ASGIApp]:
    """The middleware factory of a route answered by `run(caller, body, request)`, where body is
    the handler's `data` decoded strictly (None for an empty body)."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            request: Request[Any, Any, Any] = Request(scope, receive, send)
            caller = await authenticate(request)
            require_json_body(request.headers)
            raw = await request.body()
            decoder = decoder_of(scope["route_handler"])
            try:
                data = decoder.decode(raw) if decoder is not None and raw.strip() else None
            except msgspec.DecodeError:  # ValidationError too: the handler's path words it
                await app(scope, receive, send)
                return
            try:
                status, content, headers = await run(caller, data, request)
            except Fallback:
                await app(scope, receive, send)
                return
            body = b"" if content is None else msgspec.json.encode(content)
            extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
            start = (extra if content is None
                     else [*_JSON, (b"content-length", b"%d" % len(body)), *extra])
            await send({"type": "http.response.start", "status": status, "headers": start})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        return wrap_in_exception_handler(handle)

    return middleware


def plain_header(request: Request[Any, Any, Any], name: str, max_length: int) -> str | None:
    """A header's value when it is 1 to max_length characters with no NUL (as the handlers'
    string headers require); Fallback for anything the handler would have to refuse."""
    value = request.headers.get(name)
    if value is not None and not (0 < len(value) <= max_length and "\x00" not in value):
        raise Fallback
    return value


def int_header(request: Request[Any, Any, Any], name: str, most: int) -> int | None:
    """A header's positive integer when written plainly and at most `most`; Fallback for any
    other spelling (the handler's parameter decides those)."""
    value = request.headers.get(name)
    if value is None:
        return None
    if not _PLAIN_INT.fullmatch(value) or int(value) > most:
        raise Fallback
    return int(value)
