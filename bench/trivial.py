"""The ceiling: a trivial Litestar JSON endpoint served exactly like `dispatch serve` serves its
API (one process, uvloop installed, uvicorn with http="auto" (httptools), no access log).

Run as `python -m bench.trivial PORT`."""

from __future__ import annotations

import asyncio
import sys

import msgspec
import uvicorn
from litestar import Litestar, post


class Echo(msgspec.Struct, forbid_unknown_fields=True):
    title: str


@post("/echo", status_code=200, sync_to_thread=False)
def echo(data: Echo) -> dict[str, object]:
    return {"title": data.title, "status": "pending", "priority": 0}


def create_app() -> Litestar:
    return Litestar(route_handlers=[echo])


def main() -> None:
    import uvloop

    uvloop.install()
    port = int(sys.argv[1])
    config = uvicorn.Config(
        create_app(), host="127.0.0.1", port=port, log_config=None, access_log=False,
        lifespan="on", loop="none", http="auto",
    )
    asyncio.run(uvicorn.Server(config).serve())


if __name__ == "__main__":
    main()
