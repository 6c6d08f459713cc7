"""Task endpoints: HTTP in, one broker call, HTTP out."""

import uuid
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post, put
from litestar.datastructures import ResponseHeader
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example
from litestar.params import HeaderParameter, JSONBody, PathParameter, QueryParameter
from litestar.response import ServerSentEvent
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_204_NO_CONTENT

from dispatch.api import follow
from dispatch.api.auth import ADMIN_SECURITY, require_admin
from dispatch.api.deps import Caller, CallerDep, hide_unseen
from dispatch.api.errors import ERRORS
from dispatch.api.lane import Answer, Fallback, int_header, lane, plain_header
from dispatch.errors import Forbidden, InvalidInput, NotFound
from dispatch.models import (
    Accept,
    Approve,
    Cancel,
    Change,
    Complete,
    Depend,
    Dependencies,
    Explanation,
    Fail,
    NextClaim,
    Progress,
    Reject,
    Release,
    ReportOutcome,
    ReportOutcomeWithNext,
    RequestChanges,
    Requeue,
    Signal,
    Start,
    Suspend,
    Task,
    TaskEvent,
    TaskFilter,
    TaskWithNext,
    Undepend,
    Update,
)
from dispatch.wire import (
    MAX_REPORTS,
    NO_NUL,
    ChangesBody,
    ClaimRequest,
    CompleteReport,
    DecisionBody,
    DependBody,
    FailReport,
    NextRequest,
    ProgressReport,
    ReleaseReport,
    ReportItem,
    Reports,
    SignalBody,
    StartReport,
    SuspendReport,
    TaskCreate,
    TaskPatch,
    decode_cursor,
    encode_cursor,
    new_task,
    one_of,
    parse_statuses,
    progress_fields,
    report_body,
)

MAX_LEASE = 2_147_483_647  # a lease is a positive int4
MAX_IDEMPOTENCY_KEY = 200  # characters
FilterText = Annotated[str | None, QueryParameter(min_length=1, max_length=256, pattern=NO_NUL)]
Req = Request[Any, Any, Any]
TaskIdPath = Annotated[
    str,
    PathParameter(
        description="The task's id (a UUID).", examples=[Example(value=str(uuid.UUID(int=1)))]
    ),
]


LeaseHeader = Annotated[
    int | None,
    HeaderParameter(
        name="X-Dispatch-Lease",
        ge=1,
        le=MAX_LEASE,
        description="The lease the task was given with; a report naming another one is 409.",
    ),
]


def lease_of(body: int | None, header: int | None) -> int | None:
    """The report's lease, from its body or the X-Dispatch-Lease header (the two must agree)."""
    if body is not None and header is not None and body != header:
        raise InvalidInput("lease and X-Dispatch-Lease differ", field="lease")
    return body if body is not None else header


def parse_task_id(raw: str, field: str = "task_id") -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise InvalidInput(f"{field} must be a UUID, got {raw[:64]!r}", field=field) from None


# dispatch.jsonb_merge_patch recurses once per level of nested objects; a bound keeps a hostile
# patch from exhausting the server's stack (and is far beyond what metadata needs).
MERGE_PATCH_MAX_DEPTH = 32


def object_depth(value: object) -> int:
    """How deeply JSON objects nest in value (arrays and scalars do not count)."""
    depth, level = 0, [value]
    while level:
        objects = [v for v in level if isinstance(v, dict)]
        if not objects:
            return depth
        depth += 1
        level = [child for obj in objects for child in obj.values()]
    return depth


async def report_and_next(
    caller: Caller, change: Change, then: NextRequest | None
) -> Task | TaskWithNext:
    """A completion or failure; with `next`, the caller's claim of its next tasks too, in the
    same transaction."""
    if then is None:
        return await caller.broker.apply(change)
    task, claimed = await caller.broker.apply_then_claim(
        change,
        caller.agent_id,
        NextClaim(max_tasks=then.max_tasks, start=then.start, wait_seconds=then.wait_seconds),
    )
    return TaskWithNext(**msgspec.structs.asdict(task), next=claimed)


async def _may_name_owner(caller: Caller, owner: str) -> None:
    """auth.mode tokens: a task's owner decides whose agents run it and whose fair share it
    spends, so a caller names as owner only itself or the owner an admin gave its own agent
    (an agent of alice's creates work for alice); anyone else needs the admin token."""
    try:
        agent = await caller.broker.agents.get(caller.agent_id)
    except NotFound:
        agent = None
    if agent is None or agent.owner != owner:
        raise Forbidden(
            f"owner {owner!r}: a task's owner may be only yourself or your agent's owner "
            "(or use the admin token)",
            detail={"field": "owner"},
        )


async def create_task(
    caller: Caller, data: TaskCreate, idempotency_key: str | None
) -> tuple[int, Task, dict[str, str]]:
    """POST /tasks: the status (201 new, 200 when Idempotency-Key repeats), the task, and its
    Location."""
    new = new_task(data)
    if caller.viewer is not None and new.owner not in (None, caller.agent_id):
        await _may_name_owner(caller, new.owner)
    if caller.viewer is not None and new.parent_task_id is not None:
        # A parent the caller may not see answers as one that does not exist (the foreign
        # key's own answer), so that task ids do not leak.
        parents = await caller.broker.tasks.by_id([new.parent_task_id])
        parent = parents.get(new.parent_task_id)
        if parent is None or not caller.sees(parent):
            raise InvalidInput("parent_task_id does not exist", field="parent_task_id")
    task, created = await caller.broker.submit(
        new, requester=caller.agent_id, idempotency_key=idempotency_key, viewer=caller.viewer
    )
    status = HTTP_201_CREATED if created else HTTP_200_OK
    return status, task, {"Location": f"/api/v1/tasks/{task.task_id}"}


async def claim_tasks(
    caller: Caller, data: ClaimRequest | None, idempotency_key: str | None
) -> Task | list[Task] | None:
    """POST /tasks/claim: the task (a list with max_tasks), None when none came in time."""
    body = data or ClaimRequest()
    tasks = await caller.broker.claim_many(
        caller.agent_id,
        body.capabilities,
        max_tasks=body.max_tasks or 1,
        start=body.start,
        wait_seconds=body.wait_seconds,
        idempotency_key=idempotency_key,
    )
    if not tasks:
        return None
    return tasks if body.max_tasks is not None else tasks[0]


async def apply_reports(
    caller: Caller, data: list[ReportItem]
) -> list[ReportOutcome | ReportOutcomeWithNext]:
    """POST /tasks/reports."""
    if not 1 <= len(data) <= MAX_REPORTS:
        raise InvalidInput(
            f"reports: 1 to {MAX_REPORTS} per request, got {len(data)}", field="reports"
        )
    bodies = [report_body(item) for item in data]
    asking = [i for i, item in enumerate(data) if item.next is not None]
    if len(asking) > 1:
        raise InvalidInput("next: at most one report of a batch asks for the next tasks",
                           field="next")
    then = None
    if asking:
        ask = data[asking[0]].next
        assert ask is not None
        then = (asking[0], NextClaim(max_tasks=ask.max_tasks, start=ask.start,
                                     wait_seconds=ask.wait_seconds))
    outcomes = await caller.broker.report(
        caller.agent_id, bodies, admin=caller.admin, then=then
    )
    return await hide_unseen(caller, outcomes)


async def complete_task(
    caller: Caller, task_id: str, data: CompleteReport | None, lease_header: int | None
) -> Task | TaskWithNext:
    """POST /tasks/{id}/complete (with `next`, the agent's next tasks too)."""
    body = data or CompleteReport()
    change = Complete(
        task_id=parse_task_id(task_id),
        actor=caller.agent_id,
        result=body.result,
        admin=caller.admin,
        lease=lease_of(body.lease, lease_header),
    )
    return await report_and_next(caller, change, body.next)


async def fail_task(
    caller: Caller, task_id: str, data: FailReport | None, lease_header: int | None
) -> Task | TaskWithNext:
    """POST /tasks/{id}/fail (with `next`, the agent's next tasks too)."""
    body = data or FailReport()
    change = Fail(
        task_id=parse_task_id(task_id),
        agent_id=caller.agent_id,
        error=body.error,
        retry_eligible=body.retry_eligible,
        lease=lease_of(body.lease, lease_header),
    )
    return await report_and_next(caller, change, body.next)


# The lanes (dispatch.api.lane) of the endpoints every task passes through: the same functions
# as their handlers, without the framework's work around them.

IDEMPOTENCY_HEADER = ("idempotency-key", MAX_IDEMPOTENCY_KEY)
LEASE_HEADER = ("x-dispatch-lease", MAX_LEASE)


async def _create_lane(caller: Caller, data: TaskCreate | None, request: Req) -> Answer:
    if data is None:
        raise Fallback  # no body: the handler says what is missing
    return await create_task(caller, data, plain_header(request, *IDEMPOTENCY_HEADER))


async def _claim_lane(caller: Caller, data: ClaimRequest | None, request: Req) -> Answer:
    found = await claim_tasks(caller, data, plain_header(request, *IDEMPOTENCY_HEADER))
    return (HTTP_204_NO_CONTENT if found is None else HTTP_200_OK), found, None


async def _reports_lane(caller: Caller, data: list[ReportItem] | None, request: Req) -> Answer:
    if data is None:
        raise Fallback
    return HTTP_200_OK, await apply_reports(caller, data), None


async def _complete_lane(caller: Caller, data: CompleteReport | None, request: Req) -> Answer:
    lease = int_header(request, *LEASE_HEADER)
    task = await complete_task(caller, request.path_params["task_id"], data, lease)
    return HTTP_200_OK, task, None


async def _fail_lane(caller: Caller, data: FailReport | None, request: Req) -> Answer:
    lease = int_header(request, *LEASE_HEADER)
    task = await fail_task(caller, request.path_params["task_id"], data, lease)
    return HTTP_200_OK, task, None


class TaskController(Controller):
    path = "/tasks"
    tags = ["tasks"]  # noqa: RUF012 - Litestar's own class attribute

    @post(
        "/",
        responses=ERRORS,
        status_code=HTTP_201_CREATED,
        summary="Create a task",
        description="201 with the new task; 200 with the original when Idempotency-Key repeats.",
        response_headers=[
            ResponseHeader(name="Location", description="the task's URL", documentation_only=True)
        ],
        middleware=[lane(_create_lane)],
    )
    async def create(
        self,
        data: JSONBody[TaskCreate],
        caller: CallerDep,
        idempotency_key: Annotated[
            str | None,
            HeaderParameter(name="Idempotency-Key", min_length=1,
                            max_length=MAX_IDEMPOTENCY_KEY, pattern=NO_NUL),
        ] = None,
    ) -> Response[Task]:
        status, task, headers = await create_task(caller, data, idempotency_key)
        return Response(task, status_code=status, headers=headers)

    @get(
        "/",
        responses=ERRORS,
        summary="List tasks",
        description="Ordered by priority desc, created_at; X-Next-Cursor when there are more.",
        response_headers=[
            ResponseHeader(
                name="X-Next-Cursor", description="the next page", documentation_only=True
            )
        ],
    )
    async def list_tasks(
        self,
        caller: CallerDep,
        status: Annotated[
            str | None,
            QueryParameter(description="comma-separated statuses", max_length=256, pattern=NO_NUL),
        ] = None,
        requester: FilterText = None,
        owner: FilterText = None,
        assignee: FilterText = None,
        agent: Annotated[
            str | None,
            QueryParameter(
                description="alias of assignee", min_length=1, max_length=256, pattern=NO_NUL
            ),
        ] = None,
        scope_filter: Annotated[
            str | None,
            QueryParameter(
                name="scope",
                description="alias of capability",
                min_length=1,
                max_length=256,
                pattern=NO_NUL,
            ),
        ] = None,
        capability: FilterText = None,
        source: FilterText = None,
        parent_task_id: Annotated[uuid.UUID | None, QueryParameter()] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, QueryParameter(max_length=512)] = None,
    ) -> Response[list[Task]]:
        one_of(assignee, agent, ("assignee", "agent"))
        one_of(capability, scope_filter, ("capability", "scope"))
        filters = TaskFilter(
            statuses=parse_statuses(status) if status else None,
            requester=requester,
            owner=owner,
            assignee=assignee if assignee is not None else agent,
            capability=capability if capability is not None else scope_filter,
            source=source,
            parent_task_id=parent_task_id,
            visible_to=caller.viewer,
        )
        after = decode_cursor(cursor) if cursor else None
        tasks = await caller.broker.tasks.page(filters, limit=limit + 1, after=after)
        headers = {}
        if len(tasks) > limit:
            tasks = tasks[:limit]
            headers["X-Next-Cursor"] = encode_cursor(tasks[-1])
        return Response(tasks, headers=headers)

    @get("/{task_id:str}", responses=ERRORS, summary="Get a task")
    async def get_task(self, task_id: TaskIdPath, caller: CallerDep) -> Task:
        return caller.shown(await caller.broker.tasks.get(parse_task_id(task_id)))

    @get(
        "/{task_id:str}/stream",
        responses=ERRORS,
        summary="Follow a task live: its events as server-sent events",
        description=(
            "Each message is one event (its id the event's id, its `event` the event's name, its"
            " data the event as GET .../events gives it): the history first (after Last-Event-ID"
            " or `after` when given), then each new event as it is written, so that progress"
            " `data` arrives as a stream of partial output. After the task has ended, a last"
            " message `end` (data: its status) closes the stream."
        ),
    )
    async def stream(
        self,
        task_id: TaskIdPath,
        caller: CallerDep,
        request: Request[Any, Any, Any],
        after: Annotated[int | None, QueryParameter(ge=0, le=2**62)] = None,
        last_event_id: Annotated[
            str | None, HeaderParameter(name="Last-Event-ID", max_length=32)
        ] = None,
    ) -> ServerSentEvent:
        tid = parse_task_id(task_id)
        caller.shown(await caller.broker.tasks.get(tid))
        if last_event_id is not None and after is None:
            if not last_event_id.isdigit() or len(last_event_id) > 18:
                raise InvalidInput("Last-Event-ID must be an event id", field="Last-Event-ID")
            after = int(last_event_id)
        hub = request.app.state["follow"]
        return ServerSentEvent(follow.stream(caller.broker, hub, tid, after or 0),
                               headers={"Cache-Control": "no-store"})

    @get("/{task_id:str}/events", responses=ERRORS, summary="A task's history, oldest first")
    async def events(self, task_id: TaskIdPath, caller: CallerDep) -> list[TaskEvent]:
        tid = parse_task_id(task_id)
        if caller.viewer is not None:
            caller.shown(await caller.broker.tasks.get(tid))
        return await caller.broker.tasks.events(tid)

    @get(
        "/{task_id:str}/dependencies",
        responses=ERRORS,
        summary="What a task waits for, with their results, and the tasks waiting for it",
        description=(
            "Whoever may see the task (its agent too) reads the status, result and error of every"
            " task it depends on in this one call."
        ),
    )
    async def dependency_list(self, task_id: TaskIdPath, caller: CallerDep) -> Dependencies:
        task = caller.shown(await caller.broker.tasks.get(parse_task_id(task_id)))
        return await caller.broker.tasks.dependencies(task)

    @put(
        "/{task_id:str}/dependencies/{dependency_id:str}",
        responses=ERRORS,
        status_code=HTTP_200_OK,
        summary="Make a waiting task depend on another (its requester or an admin)",
        description=(
            "The task must be pending or blocked; it is blocked until the dependency completes."
            " A cycle is 400; a dependency that already failed, on an edge that would cancel, 409."
        ),
    )
    async def depend(
        self,
        task_id: TaskIdPath,
        dependency_id: Annotated[str, PathParameter(description="The task to wait for.")],
        caller: CallerDep,
        data: JSONBody[DependBody | None] = None,
    ) -> Task:
        change = Depend(
            task_id=parse_task_id(task_id),
            depends_on=parse_task_id(dependency_id, field="depends_on"),
            actor=caller.agent_id,
            on_failure=(data or DependBody()).on_failure,
            admin=caller.admin,
            viewer=caller.viewer,
        )
        return await caller.broker.apply(change)

    @delete(
        "/{task_id:str}/dependencies/{dependency_id:str}",
        responses=ERRORS,
        status_code=HTTP_200_OK,
        summary="Stop a waiting task from depending on another (its requester or an admin)",
    )
    async def undepend(
        self,
        task_id: TaskIdPath,
        dependency_id: Annotated[str, PathParameter(description="The task no longer waited for.")],
        caller: CallerDep,
    ) -> Task:
        change = Undepend(
            task_id=parse_task_id(task_id),
            depends_on=parse_task_id(dependency_id, field="depends_on"),
            actor=caller.agent_id,
            admin=caller.admin,
        )
        return await caller.broker.apply(change)

    @post(
        "/{task_id:str}/approve",
        responses=ERRORS,
        status_code=HTTP_200_OK,
        summary="Let a task that waits for approval run (its requester, its owner or an admin)",
    )
    async def approve(
        self, task_id: TaskIdPath, caller: CallerDep, data: JSONBody[DecisionBody | None] = None
    ) -> Task:
        return await caller.broker.apply(
            Approve(task_id=parse_task_id(task_id), actor=caller.agent_id, admin=caller.admin)
        )

    @post(
        "/{task_id:str}/reject",
        responses=ERRORS,
        status_code=HTTP_200_OK,
        summary="Cancel a task that waits for approval, with the reason",
    )
    async def reject(
        self, task_id: TaskIdPath, caller: CallerDep, data: JSONBody[DecisionBody | None] = None
    ) -> Task:
        return await caller.broker.apply(
            Reject(task_id=parse_task_id(task_id), actor=caller.agent_id,
                   reason=(data or DecisionBody()).reason, admin=caller.admin)
        )

    @post(
        "/{task_id:str}/accept",
        responses=ERRORS,
        status_code=HTTP_200_OK,
        summary="Accept the result of a task in review: it completes",
    )
    async def accept(
        self, task_id: TaskIdPath, caller: CallerDep, data: JSONBody[DecisionBody | None] = None
    ) -> Task:
        return await caller.broker.apply(
            Accept(task_id=parse_task_id(task_id), actor=caller.agent_id, admin=caller.admin)
        )

    @post(
        "/{task_id:str}/request-changes",
        responses=ERRORS,
        status_code=HTTP_200_OK,
        summary="Send a task in review back for another attempt, with what to change",
        description="The feedback is on the task (`feedback`) for the next attempt, which counts"
        " as an attempt: with no retries left the task fails.",
    )
    async def request_changes(
        self, task_id: TaskIdPath, caller: CallerDep, data: JSONBody[ChangesBody]
    ) -> Task:
        return await caller.broker.apply(
            RequestChanges(task_id=parse_task_id(task_id), actor=caller.agent_id,
                           feedback=data.feedback, admin=caller.admin)
        )

    @patch(
        "/{task_id:str}",
        responses=ERRORS,
        summary="Cancel a task, merge-patch its metadata, or change its priority (pending only)",
    )
    async def update(
        self,
        task_id: TaskIdPath,
        data: JSONBody[TaskPatch],
        caller: CallerDep,
    ) -> Task:
        tid = parse_task_id(task_id)
        one_of(data.metadata, data.context, ("metadata", "context"))
        metadata = data.metadata if data.metadata is not None else data.context
        if metadata is not None and object_depth(metadata) > MERGE_PATCH_MAX_DEPTH:
            raise InvalidInput(
                f"a metadata merge patch may nest objects at most {MERGE_PATCH_MAX_DEPTH} deep",
                field="metadata",
            )
        if data.status is None and data.reason is not None:
            raise InvalidInput("reason goes with status: cancelled", field="reason")
        if data.status is not None and data.priority is not None:
            raise InvalidInput("a cancelled task has no priority to change", field="priority")
        if data.status is None and metadata is None and data.priority is None:
            raise InvalidInput("nothing to change: give status, metadata or priority", field=None)
        changes: list[Change] = []
        if data.status == "cancelled":
            changes.append(
                Cancel(task_id=tid, actor=caller.agent_id, reason=data.reason, admin=caller.admin)
            )
        if metadata is not None or data.priority is not None:
            changes.append(
                Update(
                    task_id=tid, actor=caller.agent_id, metadata_patch=metadata,
                    priority=data.priority, admin=caller.admin,
                )
            )
        return await caller.broker.apply(*changes)

    @post(
        "/claim",
        responses={
            **ERRORS,
            HTTP_204_NO_CONTENT: ResponseSpec(None, description="No task within wait_seconds"),
        },
        status_code=HTTP_200_OK,
        summary="Pull mode: take the best pending task this agent may run",
        description=(
            "200 with the task (with max_tasks: an array of up to that many; with start: already"
            " running), 204 when none arrived within wait_seconds."
        ),
        middleware=[lane(_claim_lane)],
    )
    async def claim(
        self,
        caller: CallerDep,
        data: JSONBody[ClaimRequest | None] = None,
        idempotency_key: Annotated[
            str | None,
            HeaderParameter(
                name="Idempotency-Key", min_length=1, max_length=MAX_IDEMPOTENCY_KEY,
                pattern=NO_NUL,
                description="Sent again with the same key, the claim answers what it took the"
                " first time (while the agent holds it) instead of taking more.",
            ),
        ] = None,
    ) -> Response[Task | list[Task] | None]:
        found = await claim_tasks(caller, data, idempotency_key)
        if found is None:
            return Response(None, status_code=HTTP_204_NO_CONTENT)
        return Response(found)

    @post(
        "/reports",
        responses=ERRORS,
        status_code=HTTP_200_OK,
        summary="The calling agent's reports on several tasks, in one transaction",
        description=(
            "Each report is fenced and applied on its own; the answer has one entry per report,"
            " in order, with the HTTP status its single call would give."
        ),
        middleware=[lane(_reports_lane)],
    )
    async def reports(
        self, caller: CallerDep, data: JSONBody[Reports]
    ) -> list[ReportOutcome | ReportOutcomeWithNext]:
        return await apply_reports(caller, data)

    @post(
        "/{task_id:str}/start",
        responses=ERRORS,
        status_code=HTTP_200_OK,
        summary="The assigned agent starts",
    )
    async def start(
        self,
        task_id: TaskIdPath,
        caller: CallerDep,
        lease_header: LeaseHeader = None,
        data: JSONBody[StartReport | None] = None,
    ) -> Task:
        body = data or StartReport()
        return await caller.broker.apply(
            Start(
                task_id=parse_task_id(task_id), agent_id=caller.agent_id,
                lease=lease_of(body.lease, lease_header),
            )
        )

    @post(
        "/{task_id:str}/progress",
        responses=ERRORS,
        status_code=HTTP_200_OK,
        summary="The assigned agent reports",
    )
    async def progress(
        self,
        task_id: TaskIdPath,
        caller: CallerDep,
        lease_header: LeaseHeader = None,
        data: JSONBody[ProgressReport | None] = None,
    ) -> Task:
        body = data or ProgressReport()
        fields = progress_fields(body.percent, body.message, body.data, body.progress, body.detail)
        return await caller.broker.apply(
            Progress(
                task_id=parse_task_id(task_id),
                agent_id=caller.agent_id,
                percent=fields.percent,
                message=fields.message,
                data=fields.data,
                lease=lease_of(body.lease, lease_header),
            )
        )

    @post(
        "/{task_id:str}/complete",
        responses=ERRORS,
        status_code=HTTP_200_OK,
        summary="The assigned agent completes; or the requester, owner or an admin resolves it",
        middleware=[lane(_complete_lane)],
    )
    async def complete(
        self,
        task_id: TaskIdPath,
        caller: CallerDep,
        lease_header: LeaseHeader = None,
        data: JSONBody[CompleteReport | None] = None,
    ) -> Task | TaskWithNext:
        return await complete_task(caller, task_id, data, lease_header)

    @post(
        "/{task_id:str}/fail",
        responses=ERRORS,
        status_code=HTTP_200_OK,
        summary="The assigned agent fails",
        middleware=[lane(_fail_lane)],
    )
    async def fail(
        self,
        task_id: TaskIdPath,
        caller: CallerDep,
        lease_header: LeaseHeader = None,
        data: JSONBody[FailReport | None] = None,
    ) -> Task | TaskWithNext:
        return await fail_task(caller, task_id, data, lease_header)

    @post(
        "/{task_id:str}/release",
        responses=ERRORS,
        status_code=HTTP_200_OK,
        summary="The assigned agent gives its task back unfinished (no attempt counted)",
        description=(
            "The task is pending again at once; retry_count and error are unchanged (event"
            " released, with the reason). For an agent shutting down before the work could finish:"
            " a failure would count an attempt and dead-letter a task with no retries left."
        ),
    )
    async def release(
        self,
        task_id: TaskIdPath,
        caller: CallerDep,
        lease_header: LeaseHeader = None,
        data: JSONBody[ReleaseReport | None] = None,
    ) -> Task:
        body = data or ReleaseReport()
        return await caller.broker.apply(
            Release(
                task_id=parse_task_id(task_id), agent_id=caller.agent_id, reason=body.reason,
                lease=lease_of(body.lease, lease_header),
            )
        )

    @post(
        "/{task_id:str}/suspend",
        responses=ERRORS,
        status_code=HTTP_200_OK,
        summary="The agent sets its running task aside until a signal comes",
        description=(
            "The task is suspended: the agent's slot is free and its lease over. A signal"
            " (POST .../signal) resumes it with the payload on the task, given back to this agent"
            " when it may take it then; no signal within timeout_seconds fails the attempt."
        ),
    )
    async def suspend(
        self,
        task_id: TaskIdPath,
        data: JSONBody[SuspendReport],
        caller: CallerDep,
        lease_header: LeaseHeader = None,
    ) -> Task:
        return await caller.broker.apply(
            Suspend(
                task_id=parse_task_id(task_id), agent_id=caller.agent_id,
                waiting_for=data.waiting_for, timeout_seconds=data.timeout_seconds,
                lease=lease_of(data.lease, lease_header),
            )
        )

    @post(
        "/{task_id:str}/signal",
        responses=ERRORS,
        status_code=HTTP_200_OK,
        summary="Resume a suspended task with a payload",
        description=(
            "Its requester, its owner, an agent that held it or an admin. 409 when the task is"
            " not suspended."
        ),
    )
    async def signal(
        self, task_id: TaskIdPath, caller: CallerDep, data: JSONBody[SignalBody | None] = None
    ) -> Task:
        return await caller.broker.apply(
            Signal(task_id=parse_task_id(task_id), actor=caller.agent_id,
                   payload=(data or SignalBody()).payload, admin=caller.admin)
        )

    @get(
        "/{task_id:str}/explain",
        responses=ERRORS,
        summary="Admin: every candidate agent and why",
        guards=[require_admin],
        security=ADMIN_SECURITY,
    )
    async def explain(self, task_id: TaskIdPath, caller: CallerDep) -> Explanation:
        return await caller.broker.explain(parse_task_id(task_id))

    @post(
        "/{task_id:str}/requeue",
        responses=ERRORS,
        status_code=HTTP_200_OK,
        summary="Admin: a failed, timed-out or cancelled task starts over",
        guards=[require_admin],
        security=ADMIN_SECURITY,
    )
    async def requeue(self, task_id: TaskIdPath, caller: CallerDep) -> Task:
        return await caller.broker.apply(
            Requeue(task_id=parse_task_id(task_id), actor=caller.agent_id)
        )
