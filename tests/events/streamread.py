"""Read the stream DISPATCH_EVENTS back, message by message, as a consumer would see it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from dispatch.events.relay import STREAM


@dataclass
class Stored:
    seq: int
    subject: str
    headers: dict[str, str]
    body: dict[str, Any]


async def stream_count(nc: Client) -> int:
    try:
        info = await nc.jetstream().stream_info(STREAM)
    except NotFoundError:
        return 0
    return int(info.state.messages)


async def read_stream(nc: Client) -> list[Stored]:
    js = nc.jetstream()
    info = await js.stream_info(STREAM)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        m = await js.get_msg(STREAM, seq)
        assert m.subject is not None and m.data is not None
        out.append(Stored(seq, m.subject, dict(m.headers or {}), msgspec.json.decode(m.data)))
    return out
