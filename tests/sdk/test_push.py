"""The worker's push mode against a real `dispatch serve` and a real nats-server: the relay's
`swarm.dispatch.agent.<id>.assigned` wakes the worker at once, so a task the assigner gives it
runs without waiting for the worker's next look."""

from __future__ import annotations

from pathlib import Path

from dispatch.sdk.client import DispatchClient
from dispatch.sdk.worker import TaskContext, Worker
from tests.natsfix import NatsServer, nats_server
from tests.sdk.conftest import eventually
from tests.sdk.test_worker import working
from tests.serve import serving

__all__ = ["nats_server"]  # the fixture


def test_an_assignment_pushed_over_nats_wakes_the_worker(
    db_url: str, tmp_path: Path, nats_server: NatsServer
) -> None:
    env = {"DISPATCH_HERMES_URL": nats_server.url, "DISPATCH_RETRY_BACKOFF_MS": "0"}
    with serving(db_url, tmp_path, env=env) as sp:
        # No claims, and a look for pushed tasks only every 10 minutes: only the push can
        # bring the worker its task within the test's deadline.
        worker = Worker(sp.api, "pushed-1", nats_url=nats_server.url, claim=False,
                        adopt_seconds=600)

        @worker.handler
        async def echo(ctx: TaskContext) -> object:
            return {"title": ctx.task.title}

        with DispatchClient(sp.api, "alice") as alice, working(worker):
            eventually(lambda: [a.status for a in DispatchClient(
                sp.api, "ops", admin_token=sp.admin_token).agents()],
                lambda s: s == ["ready"], what="the worker registered")
            for title in ("first", "second"):
                task = alice.create(title)
                done = eventually(lambda t=task: alice.get(t.task_id),
                                  lambda t: t.status == "completed", timeout=30,
                                  what=f"{title} completed")
                assert done.result == {"title": title} and done.assigned_agent == "pushed-1"
                assert [e.payload.get("mode") for e in alice.events(task.task_id)
                        if e.event == "assigned"] == ["push"]
