"""What the handlers receive by dependency injection: one Caller (the broker, who
is calling, whether they presented the admin token, and which tasks they may see). One
dependency, not several: Litestar resolves several dependencies of one handler in an anyio task
group, which costs more than the work itself."""

from dataclasses import dataclass
from typing import Any

from litestar import Request
from litestar.di import NamedDependency

from dispatch.broker import Broker
from dispatch.errors import NotFound
from dispatch.models import ReportOutcome, Task


def task_visible(task: Task, agent_id: str) -> bool:
    """auth.mode tokens: a task is its requester's, its owner's and its agents' (current and
    earlier attempts) to see; admins see every task."""
    return (
        agent_id == task.requester
        or agent_id == task.owner
        or agent_id == task.assigned_agent
        or agent_id in task.previous_agents
    )


@dataclass(frozen=True, slots=True)
class Caller:
    broker: Broker
    agent_id: str
    admin: bool
    # Whose tasks the caller is limited to (auth.mode tokens, not an admin); None: every task.
    viewer: str | None = None

    def sees(self, task: Task) -> bool:
        return self.viewer is None or task_visible(task, self.viewer)

    def shown(self, task: Task) -> Task:
        """The task, or NotFound (not Forbidden, so task ids do not leak) when hidden."""
        if not self.sees(task):
            raise NotFound(f"task {task.task_id} not found")
        return task


CallerDep = NamedDependency[Caller]


def provide_caller(request: Request[Any, Any, Any]) -> Caller:
    """The Caller that the router's hook (content.admit) authenticated."""
    caller: Caller = request.state.dispatch_caller
    return caller


async def hide_unseen(caller: Caller, outcomes: list[ReportOutcome]) -> list[ReportOutcome]:
    """Batched reports: a refusal or conflict about a task the caller may not see reads as an
    unknown task, as its single call would (the error handler does that for those)."""
    if caller.viewer is None:
        return outcomes
    # Unknown ids (404) are looked up with the rest: a hidden task and a missing one take the
    # same path.
    refused = [o.task_id for o in outcomes
               if o.status in (403, 404, 409) and o.task_id is not None]
    if not refused:
        return outcomes
    tasks = await caller.broker.tasks.by_id(refused)
    hidden = {tid for tid, task in tasks.items() if not caller.sees(task)}
    return [
        ReportOutcome(task_id=o.task_id, status=404, task=None, error=f"task {o.task_id} not found")
        if o.status in (403, 409) and o.task_id in hidden
        else o
        for o in outcomes
    ]
