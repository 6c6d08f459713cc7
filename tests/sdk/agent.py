"""A worker process for the shutdown test: `python -m tests.sdk.agent URL AGENT_ID GRACE`. Each
task sleeps for its metadata's `seconds`; prints `ready` once registered. Tests start it with
`running(...)`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

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


@contextlib.contextmanager
def running(
    api: str, agent_id: str, grace: float, log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """This worker as a process, its output in `log_path`; killed at the end if still running."""
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.sdk.agent", api, agent_id, str(grace)],
            stdout=log_file, stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
