"""A worker process for the shutdown test: `python -m tests.sdk.agent URL AGENT_ID GRACE`. Each
task sleeps for its metadata's `seconds`; prints `ready` once registered."""

from __future__ import annotations

import asyncio
import logging
import sys

from dispatch.sdk.worker import TaskContext, Worker


def main() -> None:
    url, agent_id, grace = sys.argv[1], sys.argv[2], float(sys.argv[3])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    worker = Worker(url, agent_id, concurrency=4, grace_seconds=grace, poll_seconds=1)

    @worker.handler
    async def sleeper(ctx: TaskContext) -> object:
        seconds = ctx.metadata["seconds"]
        assert isinstance(seconds, int | float)
        await asyncio.sleep(seconds)
        return {"slept": seconds}

    worker.run()
    print(f"stopped: {worker.completed} completed, {worker.failed} failed", flush=True)


if __name__ == "__main__":
    main()
