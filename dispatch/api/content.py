"""Request bodies are JSON, decoded strictly: a body sent as text/plain, a form or anything else is
refused (415) before it is parsed, and a value of the wrong JSON type is refused (400) instead of
converted: "5" is not a number, 1700000000 is not a timestamp (RFC 3339 strings are), 5.0 is not an
integer. The framework's own decoding converts such values; `admit` decodes the body once more,
strictly, into the type the handler takes (a few microseconds for a body this API takes), once
it has authenticated the caller."""

from typing import Any

import msgspec
from litestar import Request
from litestar.datastructures import Headers
from litestar.exceptions import ValidationException
from litestar.handlers.base import BaseRouteHandler

from dispatch.api.auth import authenticate
from dispatch.errors import UnsupportedMediaType

# The strict decoder of each handler's body type, made on its first request.
_decoders: dict[BaseRouteHandler, msgspec.json.Decoder[Any] | None] = {}


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def decoder_of(handler: BaseRouteHandler) -> msgspec.json.Decoder[Any] | None:
    if handler not in _decoders:
        data = handler.parsed_fn_signature.parameters.get("data")
        _decoders[handler] = (
            None if data is None else msgspec.json.Decoder(data.annotation, strict=True)
        )
    return _decoders[handler]


def require_json_body(headers: Headers) -> None:
    """A request with a body must say it is JSON. A request without one (no Content-Length, or
    0, and no chunked body) may leave Content-Type out."""
    length = headers.get("content-length")
    has_body = (length is not None and length.strip() not in ("", "0")) or (
        "chunked" in headers.get("transfer-encoding", "").lower()
    )
    if not has_body:
        return
    content_type = headers.get("content-type")
    if content_type is None or not _is_json(content_type):
        raise UnsupportedMediaType(
            "request bodies must be JSON (Content-Type: application/json), got "
            + (repr(content_type[:64]) if content_type else "no Content-Type"),
            detail="content-type",
        )


async def decode_strictly(request: Request[Any, Any, Any]) -> None:
    """The body's values must have the JSON types its fields name."""
    decoder = decoder_of(request.route_handler)
    if decoder is None:
        return
    body = await request.body()  # kept by the request: the handler's decoding reads it again
    if not body.strip():
        return
    try:
        decoder.decode(body)
    except msgspec.ValidationError as exc:
        # In the form of the framework's own validation errors, answered by the same handler.
        raise ValidationException(
            detail=str(exc), extra=[{"message": str(exc), "key": "data", "source": "body"}]
        ) from exc
    except msgspec.DecodeError:
        return  # not JSON at all: the framework's decoding says so, as it always has


async def admit(request: Request[Any, Any, Any]) -> None:
    """Before every /api/v1 handler, ahead of its parameters and body: the caller is
    authenticated, then a body must be JSON and strictly so (after authentication, so a caller
    who may not call the endpoint learns nothing of its body's rules)."""
    await authenticate(request)
    require_json_body(request.headers)
    await decode_strictly(request)
