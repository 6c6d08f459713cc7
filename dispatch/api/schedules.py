"""Schedules (admin): recurring tasks made by every replica's scheduler, exactly once a fire.

A create, an update or a resume is one transaction (Broker.schedule_*): the row, then the task a
fire would make, made and taken back (so a template the create would refuse is a 400 now, not a
paused schedule later), then the next fire, computed by the database's clock so that the answer
shows it."""

from typing import Annotated, Any

import msgspec
from litestar import Controller, delete, get, patch, post
from litestar.params import JSONBody, PathParameter, QueryParameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_204_NO_CONTENT

from dispatch.api.auth import ADMIN_SECURITY, require_admin
from dispatch.api.deps import CallerDep
from dispatch.api.errors import ERRORS
from dispatch.errors import NotFound
from dispatch.models import Schedule, Task
from dispatch.wire import ScheduleCreate, SchedulePatch, schedule_template

NamePath = Annotated[
    str, PathParameter(description="The schedule's name: letters, digits, '_' and '-'.")
]


def _gone(name: str) -> NotFound:
    return NotFound(f"schedule {name} does not exist")


class ScheduleController(Controller):
    path = "/schedules"
    tags = ["schedules"]  # noqa: RUF012 - Litestar's own class attribute
    guards = [require_admin]  # noqa: RUF012
    security = ADMIN_SECURITY

    @post("/", responses=ERRORS, status_code=HTTP_201_CREATED, summary="Create a schedule")
    async def create(self, caller: CallerDep, data: JSONBody[ScheduleCreate]) -> Schedule:
        fields: dict[str, Any] = msgspec.structs.asdict(data)
        name = fields.pop("name")
        fields["template"] = schedule_template(data.template)
        return await caller.broker.schedule_create(name, fields)

    @get("/", responses=ERRORS, summary="Every schedule, by name")
    async def list_schedules(self, caller: CallerDep) -> list[Schedule]:
        return await caller.broker.schedules.list_all()

    @get("/{name:str}", responses=ERRORS, summary="A schedule, with its next and last fire")
    async def get_schedule(self, name: NamePath, caller: CallerDep) -> Schedule:
        found = await caller.broker.schedules.get(name)
        if found is None:
            raise _gone(name)
        return found

    @patch(
        "/{name:str}", responses=ERRORS, status_code=HTTP_200_OK,
        summary="Change a schedule (a new timing applies from now on)",
    )
    async def update(
        self, name: NamePath, caller: CallerDep, data: JSONBody[SchedulePatch]
    ) -> Schedule:
        fields = {k: v for k, v in msgspec.structs.asdict(data).items() if v is not None}
        if "template" in fields:
            fields["template"] = schedule_template(fields["template"])
        return await caller.broker.schedule_update(name, fields)

    @post("/{name:str}/pause", responses=ERRORS, status_code=HTTP_200_OK,
          summary="Pause a schedule: no fires until it is resumed")
    async def pause(self, name: NamePath, caller: CallerDep) -> Schedule:
        return await caller.broker.schedules.pause(name)

    @post("/{name:str}/resume", responses=ERRORS, status_code=HTTP_200_OK,
          summary="Resume a schedule: it fires from now on (the paused fires are not made)")
    async def resume(self, name: NamePath, caller: CallerDep) -> Schedule:
        return await caller.broker.schedule_resume(name)

    @delete("/{name:str}", responses=ERRORS, status_code=HTTP_204_NO_CONTENT,
            summary="Delete a schedule (the tasks it made stay)")
    async def delete_schedule(self, name: NamePath, caller: CallerDep) -> None:
        if not await caller.broker.schedules.delete(name):
            raise _gone(name)

    @post("/{name:str}/run", responses=ERRORS, status_code=HTTP_201_CREATED,
          summary="Run now: one task from the template at once, outside the timing")
    async def run_now(self, name: NamePath, caller: CallerDep) -> Task:
        return await caller.broker.schedules.run_now(name, caller.agent_id)

    @get("/{name:str}/tasks", responses=ERRORS, summary="The newest tasks the schedule made")
    async def tasks(
        self, name: NamePath, caller: CallerDep,
        limit: Annotated[int, QueryParameter(ge=1, le=500)] = 20,
    ) -> list[Task]:
        if await caller.broker.schedules.get(name) is None:
            raise _gone(name)
        return await caller.broker.schedules.tasks(name, limit=limit)
