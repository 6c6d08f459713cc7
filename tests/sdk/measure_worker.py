"""Quick throughput measurement of the worker SDK (not a test): tasks/s that one worker process
drains from a backlog, with a no-op handler, against one `dispatch serve` process.

    .venv/bin/python -m tests.sdk.measure_worker [--tasks 1000] [--concurrency 4 16]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from dispatch.sdk.client import AsyncDispatchClient
from dispatch.sdk.worker import TaskContext, Worker
from tests import pg
from tests.serve import serving


async def drain(api: str, tasks: int, concurrency: int) -> float:
    agent = f"measure-{concurrency}"
    async with AsyncDispatchClient(api, "requester") as client:
        for start in range(0, tasks, 50):
            await asyncio.gather(*(client.create("noop", required_capabilities=[agent])
                                   for _ in range(min(50, tasks - start))))
        worker = Worker(api, agent, capabilities=[agent], concurrency=concurrency)

        @worker.handler
        async def noop(ctx: TaskContext) -> object:
            return None

        began = time.perf_counter()
        serving_task = asyncio.create_task(worker.serve())
        while worker.completed < tasks:
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - began
        worker.stop()
        await serving_task
        return tasks / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 16])
    args = parser.parse_args()
    with pg.server_url() as server, tempfile.TemporaryDirectory() as tmp:
        pg.create_template(server)
        url = pg.clone_database(server)
        with serving(url, Path(tmp)) as sp:
            for concurrency in args.concurrency:
                rate = asyncio.run(drain(sp.api, args.tasks, concurrency))
                print(f"concurrency {concurrency:3}: {args.tasks} tasks at {rate:,.0f} tasks/s")


if __name__ == "__main__":
    main()
