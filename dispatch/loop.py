"""The shape every background loop shares: start() runs `_run()` as a task, stop() cancels it."""

from __future__ import annotations

import asyncio
import contextlib


class BackgroundLoop:
    """Subclasses implement `_run()` (which loops until cancelled) and may override `_close()`."""

    task_name = "dispatch-loop"
    _task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._close()

    async def _run(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        """Release what the loop holds (clients, connections) after it has stopped."""
