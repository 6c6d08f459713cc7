"""The dashboard's routes under /ui: pages rendered on the server, the actions behind their buttons
(plain form POSTs that redirect back), the static assets and the live stream.

The pages call the Broker and Store in-process, as the API controllers do. Live parts of a page
are elements whose id names a fragment; the hub pushes {id: html} and dispatch.js swaps them in,
so a page and its updates come from the same templates.
"""

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Any
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from litestar import MediaType, Request, Response, Router, get, post
from litestar.exceptions import HTTPException, ValidationException
from litestar.params import PathParameter
from litestar.response import Redirect, ServerSentEvent
from litestar.response.sse import ServerSentEventMessage

from dispatch.broker import Broker
from dispatch.errors import DispatchError, InvalidInput, NotFound
from dispatch.metrics import Metrics
from dispatch.models import (
    TERMINAL_STATUSES,
    Accept,
    Approve,
    Cancel,
    Change,
    Cursor,
    Reject,
    RequestChanges,
    Requeue,
    Signal,
    Task,
    TaskFilter,
    TaskStatus,
)
from dispatch.notify import Listener
from dispatch.settings import UiSettings
from dispatch.ui import charts, task_list, timeline
from dispatch.ui.hub import KEEP_SECONDS, Hub
from dispatch.ui.session import COOKIE, Sessions, same_origin
from dispatch.ui.throttle import SignInThrottle
from dispatch.wire import AGENT_ID_RE, decode_cursor, encode_cursor

# The actor of the events the dashboard's buttons write.
UI_ACTOR = "admin"
PAGE_SIZE = 50
OVERVIEW = "overview"
TASK_TOPIC = "task:"
SCHEDULES = "schedules"
SCHEDULE_TOPIC = "schedule:"
AGENT_TOPIC = "agent:"
# An agent's page lists this many of its current tasks and of those it ended last.
AGENT_TASKS = 20
# The newest tasks a schedule's page lists.
SCHEDULE_TASKS = 20
# Checked by the handlers themselves (a clear 4xx page), so only the type here.
PathText = Annotated[str, PathParameter()]
SCHEDULE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}\Z")
STATIC = {
    "dispatch.css": "text/css; charset=utf-8",
    "dispatch.js": "text/javascript; charset=utf-8",
}


def _span(seconds: float) -> str:
    """A length of time, the one way the dashboard writes it: whole seconds under a minute, whole
    minutes under an hour, whole hours under two days, then days."""
    n = int(max(0.0, seconds))
    if n < 60:
        return f"{n} s"
    if n < 3600:
        return f"{n // 60} min"
    if n < 172800:
        return f"{n // 3600} h"
    return f"{n // 86400} d"


def _age(then: datetime | None, now: datetime) -> str:
    """When, relative to now ("3 min ago", "in 20 s"); the absolute time goes in a title."""
    if then is None:
        return "never"
    seconds = (now - then).total_seconds()
    return f"{_span(seconds)} ago" if seconds >= 0 else f"in {_span(-seconds)}"


def _seconds(value: float | None) -> str:
    return "none" if value is None else _span(value)


def _ms(value: float | None) -> str:
    """A latency: milliseconds under a second, then as any other length of time."""
    if value is None:
        return "n/a"
    return f"{value:.0f} ms" if value < 1000 else _span(value / 1000)


def _json(value: object) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def _time(value: datetime | None) -> str:
    return "" if value is None else f"{value:%Y-%m-%d %H:%M:%S} UTC"


def _fire(task: Task) -> str:
    """Which fire of its schedule made a task (its key is fire:<UTC time>), or "run now"."""
    key = task.idempotency_key or ""
    if not key.startswith("fire:"):
        return "run now"
    try:
        return _time(datetime.fromisoformat(key.removeprefix("fire:")))
    except ValueError:
        return key.removeprefix("fire:")


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("dispatch.ui", "templates"),
        autoescape=select_autoescape(default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["ago"] = _age
    env.filters["seconds"] = _seconds
    env.filters["ms"] = _ms
    env.filters["tojson_pretty"] = _json
    env.filters["time"] = _time
    env.filters["fire"] = _fire
    return env


@dataclass
class Dashboard:
    """What the /ui handlers share (in app.state.ui): one per process."""

    broker: Broker
    sessions: Sessions
    env: Environment
    hub: Hub
    assets: dict[str, bytes]
    throttle: SignInThrottle

    def render(self, template: str, **context: Any) -> str:
        return self.env.get_template(template).render(**context)

    def page(
        self, template: str, status_code: int = 200, headers: dict[str, str] | None = None,
        **context: Any,
    ) -> Response[str]:
        return Response(
            self.render(template, **context),
            status_code=status_code,
            media_type=MediaType.HTML,
            headers={"Cache-Control": "no-store", **(headers or {})},
        )

    # -- what the hub computes: one set of queries per topic, however many tabs show it ----------

    async def overview_context(self) -> dict[str, Any]:
        reads = self.broker.reads
        async with self.broker.fresh_reads(), reads.insights.transaction() as conn:
            stats = await reads.insights.stats(conn=conn)
            series = await reads.insights.ui_series(conn=conn)
            agents = await reads.agents.all(conn=conn)
            flow = await reads.insights.flow(conn=conn)
        return {
            "replica": self.broker.replica() if self.broker.replica is not None else None,
            "stats": stats,
            "statuses": [s.value for s in TaskStatus],
            "throughput": charts.throughput(series),
            "wait": charts.wait(series),
            "agents": agents,
            "flow": flow,
            "now": datetime.now(UTC),
        }

    async def agent_context(self, agent_id: str) -> dict[str, Any]:
        reads = self.broker.reads
        async with self.broker.fresh_reads(), reads.insights.transaction() as conn:
            agent = await reads.agents.get(agent_id, conn=conn)
            current = await reads.tasks.page(
                TaskFilter(assignee=agent_id, statuses=[TaskStatus.ASSIGNED, TaskStatus.RUNNING]),
                limit=AGENT_TASKS, conn=conn,
            )
            activity = await reads.insights.agent_activity(agent_id, limit=AGENT_TASKS,
                                                           conn=conn)
        ended = activity["completed"] + activity["failed"]
        return {
            "agent": agent,
            "current": current,
            "activity": activity,
            "failure_rate": activity["failed"] / ended if ended else None,
            "limit": AGENT_TASKS,
            "now": datetime.now(UTC),
        }

    async def tasks_context(
        self, listing: task_list.ListQuery, after: Cursor | None = None
    ) -> dict[str, Any]:
        reads = self.broker.reads
        async with self.broker.fresh_reads(), reads.tasks.transaction() as conn:
            rows = await reads.tasks.ui_page(listing.filters, order=listing.order,
                                             limit=PAGE_SIZE + 1, after=after, conn=conn)
            count = await reads.tasks.ui_count(listing.filters, limit=task_list.BULK_LIMIT,
                                               conn=conn)
        next_link = None
        if len(rows) > PAGE_SIZE:
            rows = rows[:PAGE_SIZE]
            next_link = "/ui/tasks?" + listing.query(cursor=encode_cursor(rows[-1]))
        return {"tasks": rows, "listing": listing, "filters": listing.values,
                "count": count, "bulk_limit": task_list.BULK_LIMIT, "next_link": next_link,
                "now": datetime.now(UTC)}

    async def task_context(self, task_id: uuid.UUID) -> dict[str, Any]:
        reads = self.broker.reads
        async with self.broker.fresh_reads():
            task = await reads.tasks.get(task_id)
            events = await reads.tasks.events(task_id)
            explanation = await self.broker.explain(task_id)
            dependencies = await reads.tasks.dependencies(task)
        return {
            "task": task,
            "deps": dependencies,
            "events": events,
            "timeline": timeline.entries(events),
            "explain": explanation,
            "terminal": task.status in TERMINAL_STATUSES,
            "now": datetime.now(UTC),
        }

    async def schedules_context(self) -> dict[str, Any]:
        return {"schedules": await self.broker.schedules.list_all()}

    async def schedule_context(self, name: str) -> dict[str, Any]:
        schedules = self.broker.schedules
        async with schedules.transaction() as conn:
            found = await schedules.get(name, conn=conn)
            if found is None:
                raise NotFound(f"schedule {name} does not exist")
            made = await schedules.tasks(name, limit=SCHEDULE_TASKS, conn=conn)
        return {"s": found, "tasks": made, "limit": SCHEDULE_TASKS}

    async def compute(self, topic: str) -> str:
        """One topic's live fragments, {element id: html}, as JSON."""
        fragments: dict[str, str]
        if topic == OVERVIEW:
            ctx = await self.overview_context()
            fragments = {
                "overview-cards": self.render("_overview_cards.html", **ctx),
                "overview-charts": self.render("_overview_charts.html", **ctx),
                "overview-queues": self.render("_overview_queues.html", **ctx),
                "agents-table": self.render("_agents_table.html", **ctx),
                "overview-flow": self.render("_overview_flow.html", **ctx),
            }
        elif topic.startswith(task_list.TOPIC):
            ctx = await self.tasks_context(task_list.from_topic(topic))
            fragments = {"tasks-table": self.render("_tasks_table.html", **ctx)}
        elif topic.startswith(AGENT_TOPIC):
            try:
                ctx = await self.agent_context(topic.removeprefix(AGENT_TOPIC))
            except NotFound:
                # Deleted while its page was open.
                fragments = {"agent-summary": "<p>This agent no longer exists.</p>"}
            else:
                fragments = {
                    "agent-summary": self.render("_agent_summary.html", **ctx),
                    "agent-tasks": self.render("_agent_tasks.html", **ctx),
                }
        elif topic == SCHEDULES:
            ctx = await self.schedules_context()
            fragments = {"schedules-table": self.render("_schedules_table.html", **ctx)}
        elif topic.startswith(SCHEDULE_TOPIC):
            try:
                ctx = await self.schedule_context(topic.removeprefix(SCHEDULE_TOPIC))
            except NotFound:
                # Deleted while its page was open.
                fragments = {"schedule-summary": "<p>This schedule no longer exists.</p>"}
            else:
                fragments = {
                    "schedule-summary": self.render("_schedule_summary.html", **ctx),
                    "schedule-tasks": self.render("_schedule_tasks.html", **ctx),
                }
        else:
            task_id = uuid.UUID(topic.removeprefix(TASK_TOPIC))
            try:
                ctx = await self.task_context(task_id)
            except NotFound:
                # Pruned while its page was open.
                fragments = {"task-summary": "<p>This task no longer exists.</p>"}
            else:
                fragments = {
                    "task-summary": self.render("_task_summary.html", **ctx),
                    "task-timeline": self.render("_task_timeline.html", **ctx),
                    "task-explain": self.render("_task_explain.html", **ctx),
                }
        return json.dumps(fragments)


def _ui(request: Request[Any, Any, Any]) -> Dashboard:
    ui: Dashboard = request.app.state.ui
    return ui


# -- sign-in -------------------------------------------------------------------------------------


async def require_session(request: Request[Any, Any, Any]) -> Response[Any] | None:
    """Before every /ui handler: no session, no dashboard (pages redirect to the sign-in, the
    rest is 401); and no state change from another site's page (403)."""
    opt = request.route_handler.opt
    ui = _ui(request)
    if request.method == "POST" and not same_origin(request.headers, request.headers.get("host")):
        return Response("cross-site request refused", status_code=403,
                        media_type=MediaType.TEXT)
    if opt.get("public"):
        return None
    if not await ui.sessions.valid(request.cookies.get(COOKIE)):
        if opt.get("page"):
            return Redirect("/ui/login", status_code=303)
        return Response("sign in at /ui/login first", status_code=401, media_type=MediaType.TEXT)
    return None


@get("/login", opt={"public": True}, include_in_schema=False)
async def login_form(request: Request[Any, Any, Any]) -> Response[str]:
    return _ui(request).page("login.html", error=None)


@post("/login", opt={"public": True}, include_in_schema=False)
async def login(request: Request[Any, Any, Any]) -> Response[Any]:
    ui = _ui(request)
    client = request.client.host if request.client is not None else ""
    # Refused before the token is looked at: a guesser learns nothing faster than the refill.
    wait = ui.throttle.retry_after(client)
    if wait:
        return ui.page(
            "login.html", status_code=429, headers={"Retry-After": str(wait)},
            error=f"Too many wrong tokens: try again in {wait} s.",
        )
    form = await request.form()
    token = form.get("token")
    if not isinstance(token, str) or not ui.sessions.token_matches(token.strip()):
        ui.throttle.failed(client)
        return ui.page("login.html", status_code=403, error="That is not the admin token.")
    response: Response[Any] = Redirect("/ui", status_code=303)
    response.set_cookie(
        COOKIE, await ui.sessions.start(), max_age=ui.sessions.lifetime, path="/ui", httponly=True,
        samesite="strict", secure=request.url.scheme == "https",
    )
    return response


@post("/logout", include_in_schema=False)
async def logout(request: Request[Any, Any, Any]) -> Response[Any]:
    """End the session: its row goes, so the cookie (and any copy of it) stops working on every
    replica, and its open streams end at their hub's next refresh."""
    ui = _ui(request)
    await ui.sessions.end(request.cookies.get(COOKIE))
    ui.hub.poke()
    response: Response[Any] = Redirect("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response


# -- pages ---------------------------------------------------------------------------------------


@get("/", opt={"page": True}, include_in_schema=False)
async def overview(request: Request[Any, Any, Any]) -> Response[str]:
    ui = _ui(request)
    ctx = await ui.overview_context()
    return ui.page("overview.html", topic=OVERVIEW, nav="overview", **ctx)


@get("/agents", opt={"page": True}, include_in_schema=False)
async def agents(request: Request[Any, Any, Any]) -> Response[str]:
    ui = _ui(request)
    async with ui.broker.fresh_reads():
        found = await ui.broker.reads.agents.all()
    return ui.page("agents.html", topic=OVERVIEW, nav="agents", agents=found,
                   now=datetime.now(UTC))


@get("/agent", opt={"page": True}, include_in_schema=False)
async def agent_page(request: Request[Any, Any, Any]) -> Response[str]:
    """One agent: /ui/agent?id=<agent id> (an id may hold "/", so not in the path)."""
    ui = _ui(request)
    agent_id = request.query_params.get("id") or ""
    if not AGENT_ID_RE.match(agent_id):
        raise InvalidInput("id: 1 to 128 characters of [A-Za-z0-9._:@/-]", field="id")
    ctx = await ui.agent_context(agent_id)
    return ui.page("agent.html", topic=f"{AGENT_TOPIC}{agent_id}", nav="agents", **ctx)


def _filter_value(request: Request[Any, Any, Any], name: str) -> str | None:
    return task_list.value(name, request.query_params.get(name))


@get("/tasks", opt={"page": True}, include_in_schema=False)
async def tasks(request: Request[Any, Any, Any]) -> Response[str]:
    """The task list: filters, search, order, newest first by default; the first page is live
    (topic tasks?<query>), later pages are not."""
    ui = _ui(request)
    listing = task_list.parse(lambda name: request.query_params.getall(name, []))
    raw_cursor = _filter_value(request, "cursor")
    after = decode_cursor(raw_cursor) if raw_cursor else None
    ctx = await ui.tasks_context(listing, after)
    notice = _filter_value(request, "done")
    return ui.page(
        "tasks.html", nav="tasks", topic=None if after else task_list.TOPIC + listing.query(),
        statuses=[s.value for s in TaskStatus], first_link=(
            "/ui/tasks?" + listing.query()) if after else None,
        notice=notice, **ctx,
    )


@post("/tasks/bulk", include_in_schema=False)
async def bulk(request: Request[Any, Any, Any]) -> Redirect:
    """Requeue or cancel every task the posted filter selects now (at most BULK_LIMIT), through
    the same broker changes as a task's buttons, BULK_BATCH to a transaction; a task that moved
    on meanwhile is skipped and counted."""
    ui = _ui(request)
    form = await request.form()
    listing = task_list.parse(lambda name: form.getall(name, []))
    action = form.get("action")
    if action not in ("requeue", "cancel"):
        raise InvalidInput("action: requeue or cancel", field="action")
    if not listing.filters.statuses and not any(listing.values.values()):
        raise InvalidInput("filter the tasks first: a bulk action does not take every task",
                           field="status")
    async with ui.broker.fresh_reads():
        ids = await ui.broker.store.tasks.ui_ids(listing.filters, limit=task_list.BULK_LIMIT)
    changes: list[Change] = [
        Requeue(task_id=tid, actor=UI_ACTOR) if action == "requeue" else
        Cancel(task_id=tid, actor=UI_ACTOR, reason="cancelled from the dashboard (bulk)",
               admin=True)
        for tid in ids
    ]
    applied, skipped = await ui.broker.apply_each(changes, batch=task_list.BULK_BATCH)
    done = f"{'Requeued' if action == 'requeue' else 'Cancelled'} {applied}"
    if skipped:
        done += f"; {len(skipped)} skipped (changed meanwhile: {skipped[0][1][:120]})"
    return Redirect("/ui/tasks?" + listing.query(done=done), status_code=303)


def _task_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise InvalidInput(f"task id must be a UUID, got {raw[:64]!r}", field="task_id") from None


@get("/tasks/{task_id:str}", opt={"page": True}, include_in_schema=False)
async def task_page(request: Request[Any, Any, Any], task_id: PathText) -> Response[str]:
    ui = _ui(request)
    tid = _task_id(task_id)
    ctx = await ui.task_context(tid)
    return ui.page("task.html", topic=f"{TASK_TOPIC}{tid}", nav="tasks", **ctx)


# -- actions: the buttons, with the API's validation and events ------------------------------------


@post("/tasks/{task_id:str}/cancel", include_in_schema=False)
async def cancel(request: Request[Any, Any, Any], task_id: PathText) -> Redirect:
    tid = _task_id(task_id)
    await _ui(request).broker.apply(
        Cancel(task_id=tid, actor=UI_ACTOR, reason="cancelled from the dashboard", admin=True)
    )
    return Redirect(f"/ui/tasks/{tid}", status_code=303)


@post("/tasks/{task_id:str}/requeue", include_in_schema=False)
async def requeue(request: Request[Any, Any, Any], task_id: PathText) -> Redirect:
    tid = _task_id(task_id)
    await _ui(request).broker.apply(Requeue(task_id=tid, actor=UI_ACTOR))
    return Redirect(f"/ui/tasks/{tid}", status_code=303)


@post("/tasks/{task_id:str}/decide", include_in_schema=False)
async def decide(request: Request[Any, Any, Any], task_id: PathText) -> Redirect:
    """A person's decision: approve, reject (with a reason), accept, request changes (with the
    feedback for the next attempt), signal a suspended task (with a JSON payload); the same
    broker calls as the API's."""
    tid = _task_id(task_id)
    form = await request.form()
    decision, text = form.get("decision"), form.get("text")
    text = text.strip() if isinstance(text, str) and text.strip() else None
    if text is not None and (len(text) > 65536 or "\x00" in text):
        raise InvalidInput("the text must be at most 64 KiB, without NUL", field="text")
    change: Change
    match decision:
        case "approve":
            change = Approve(task_id=tid, actor=UI_ACTOR, admin=True)
        case "reject":
            change = Reject(task_id=tid, actor=UI_ACTOR, reason=text, admin=True)
        case "accept":
            change = Accept(task_id=tid, actor=UI_ACTOR, admin=True)
        case "request-changes":
            if text is None:
                raise InvalidInput("say what to change", field="text")
            change = RequestChanges(task_id=tid, actor=UI_ACTOR, feedback=text, admin=True)
        case "signal":
            try:
                payload = json.loads(text) if text is not None else None
            except json.JSONDecodeError as exc:
                raise InvalidInput(f"the payload is not JSON: {exc}", field="text") from None
            change = Signal(task_id=tid, actor=UI_ACTOR, payload=payload, admin=True)
        case _:
            raise InvalidInput("decision: approve, reject, accept, request-changes or signal",
                               field="decision")
    await _ui(request).broker.apply(change)
    return Redirect(f"/ui/tasks/{tid}", status_code=303)


async def _form_agent_id(request: Request[Any, Any, Any]) -> str:
    # The agent id travels in the form, not the path: an id may contain "/".
    agent_id = (await request.form()).get("agent_id")
    if not isinstance(agent_id, str) or not AGENT_ID_RE.match(agent_id):
        raise InvalidInput("agent_id: 1 to 128 characters of [A-Za-z0-9._:@/-]", field="agent_id")
    return agent_id


async def _back_to(request: Request[Any, Any, Any], agent_id: str) -> Redirect:
    """Back to the agent's page when the form came from it, else to the agents."""
    if (await request.form()).get("back") == "agent":
        return Redirect("/ui/agent?" + urlencode({"id": agent_id}), status_code=303)
    return Redirect("/ui/agents", status_code=303)


@post("/agents/drain", include_in_schema=False)
async def drain(request: Request[Any, Any, Any]) -> Redirect:
    agent_id = await _form_agent_id(request)
    await _ui(request).broker.agents.drain(agent_id, True)
    return await _back_to(request, agent_id)


@post("/agents/undrain", include_in_schema=False)
async def undrain(request: Request[Any, Any, Any]) -> Redirect:
    agent_id = await _form_agent_id(request)
    await _ui(request).broker.agents.drain(agent_id, False)
    return await _back_to(request, agent_id)


@post("/agents/delete", include_in_schema=False)
async def delete_agent(request: Request[Any, Any, Any]) -> Redirect:
    """Remove an agent with no active tasks; with some, the error page names them."""
    await _ui(request).broker.agents.delete(await _form_agent_id(request))
    return Redirect("/ui/agents", status_code=303)


# -- schedules -------------------------------------------------------------------------------------


def _schedule_name(raw: str) -> str:
    if not SCHEDULE_NAME_RE.match(raw):
        raise InvalidInput("schedule name: 1 to 128 letters, digits, '_' and '-'", field="name")
    return raw


@get("/schedules", opt={"page": True}, include_in_schema=False)
async def schedules(request: Request[Any, Any, Any]) -> Response[str]:
    ui = _ui(request)
    ctx = await ui.schedules_context()
    return ui.page("schedules.html", topic=SCHEDULES, nav="schedules", **ctx)


@get("/schedules/{name:str}", opt={"page": True}, include_in_schema=False)
async def schedule_page(request: Request[Any, Any, Any], name: PathText) -> Response[str]:
    ui = _ui(request)
    found = _schedule_name(name)
    ctx = await ui.schedule_context(found)
    return ui.page("schedule.html", topic=f"{SCHEDULE_TOPIC}{found}", nav="schedules", **ctx)


@post("/schedules/{name:str}/{action:str}", include_in_schema=False)
async def schedule_action(
    request: Request[Any, Any, Any], name: PathText, action: PathText
) -> Redirect:
    """pause, resume (as the API resumes: refused for an expression the scheduler cannot read,
    and the next fire computed at once) or run (one task now)."""
    schedules = _ui(request).broker.schedules
    name = _schedule_name(name)
    if action == "pause":
        await schedules.pause(name)
    elif action == "resume":
        await _ui(request).broker.schedule_resume(name)
    elif action == "run":
        await schedules.run_now(name, UI_ACTOR)
    else:
        raise NotFound(f"no action {action[:32]!r} on a schedule (pause, resume, run)")
    return Redirect(f"/ui/schedules/{name}", status_code=303)


# -- assets and the live stream ------------------------------------------------------------------


@get("/static/{name:str}", include_in_schema=False)
async def static(request: Request[Any, Any, Any], name: PathText) -> Response[bytes]:
    ui = _ui(request)
    if name not in ui.assets:
        raise NotFound(f"no asset {name[:64]!r}")
    return Response(
        ui.assets[name], media_type=STATIC[name], headers={"Cache-Control": "private, max-age=300"}
    )


@get("/events", include_in_schema=False)
async def events(request: Request[Any, Any, Any]) -> ServerSentEvent:
    """The live stream of one topic; it holds no database connection while it waits."""
    ui = _ui(request)
    session = ui.sessions.session_hash(request.cookies.get(COOKIE))
    topic = request.query_params.get("topic", "")
    if topic.startswith(TASK_TOPIC):
        topic = f"{TASK_TOPIC}{_task_id(topic.removeprefix(TASK_TOPIC))}"
    elif topic.startswith(SCHEDULE_TOPIC):
        _schedule_name(topic.removeprefix(SCHEDULE_TOPIC))
    elif topic.startswith(task_list.TOPIC):
        topic = task_list.TOPIC + task_list.from_topic(topic).query()
    elif topic.startswith(AGENT_TOPIC):
        if not AGENT_ID_RE.match(topic.removeprefix(AGENT_TOPIC)):
            raise InvalidInput("agent:<agent id>: 1 to 128 characters of [A-Za-z0-9._:@/-]",
                               field="topic")
    elif topic not in (OVERVIEW, SCHEDULES):
        raise InvalidInput(
            "topic is overview, task:<task id>, agent:<agent id>, tasks?<query>, schedules or "
            "schedule:<name>",
            field="topic",
        )

    async def stream() -> Any:
        # A first comment, so that the browser's EventSource reports the stream open at once.
        yield ServerSentEventMessage(comment="live")
        async with ui.hub.subscribe(topic, session) as queue:
            while (payload := await queue.get()) is not None:
                yield ServerSentEventMessage(event="update", data=payload)

    return ServerSentEvent(stream(), headers={"Cache-Control": "no-store"})


# -- errors: a page that says what was wrong, never a 500 for bad input -------------------------


def _error_page(request: Request[Any, Any, Any], status: int, message: str) -> Response[str]:
    return _ui(request).page("error.html", status_code=status, status=status, message=message)


def dispatch_error(request: Request[Any, Any, Any], exc: DispatchError) -> Response[str]:
    return _error_page(request, exc.status, exc.message)


def validation_error(request: Request[Any, Any, Any], exc: ValidationException) -> Response[str]:
    return _error_page(request, 400, f"invalid request: {exc.detail}")


def http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[str]:
    return _error_page(request, exc.status_code, str(exc.detail))


def create_ui(
    settings: UiSettings,
    broker: Broker,
    admin_token: str,
    *,
    listener: Listener | None = None,
    metrics: Metrics | None = None,
) -> tuple[Router, Dashboard]:
    """The /ui router and the process's Dashboard (with its hub) to put in app.state.ui."""

    async def keep() -> None:
        await broker.config.ui_notify_keep(KEEP_SECONDS)

    dashboard: Dashboard
    sessions = Sessions(admin_token, settings.session_hours * 3600, broker.ui_sessions)
    hub = Hub(
        lambda topic: dashboard.compute(topic),
        listener=listener,
        keep=keep,
        alive=sessions.live,
        refresh_seconds=settings.refresh_ms / 1000,
        tick_seconds=settings.tick_ms / 1000,
        metrics=metrics,
    )
    assets = {
        name: resources.files("dispatch.ui").joinpath("static", name).read_bytes()
        for name in STATIC
    }
    dashboard = Dashboard(
        broker=broker,
        sessions=sessions,
        throttle=SignInThrottle(
            client_burst=settings.sign_in_burst,
            client_per_minute=settings.sign_in_per_minute,
            global_burst=settings.sign_in_global_burst,
            global_per_minute=settings.sign_in_global_per_minute,
        ),
        env=_environment(),
        hub=hub,
        assets=assets,
    )
    router = Router(
        path="/ui",
        route_handlers=[login_form, login, logout, overview, agents, agent_page, tasks, task_page,
                        bulk, cancel, requeue, decide, drain, undrain, delete_agent, schedules,
                        schedule_page, schedule_action, static, events],
        before_request=require_session,
        exception_handlers={
            DispatchError: dispatch_error,  # type: ignore[dict-item]
            ValidationException: validation_error,  # type: ignore[dict-item]
            HTTPException: http_error,  # type: ignore[dict-item]
        },
        include_in_schema=False,
    )
    return router, dashboard

