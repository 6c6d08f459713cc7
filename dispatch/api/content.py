"""Request bodies are JSON: a body sent as text/plain, a form or anything else is refused (415)
before it is parsed, instead of being read as JSON whatever its declared type."""

from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from dispatch.errors import UnsupportedMediaType


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def require_json_body(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    """Guard of every /api/v1 route: a request with a body must say it is JSON. A request without
    one (no Content-Length, or 0, and no chunked body) may leave Content-Type out."""
    headers = connection.headers
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
