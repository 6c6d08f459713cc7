"""The client side of the `dispatch` command: tasks, agents, a worker that runs a command per task,
and `top`. Imports only the client (httpx, msgspec): it runs on an agent host without the server.

Connection settings come from options or the environment: DISPATCH_URL (default
http://localhost:8600), DISPATCH_AGENT_ID (the X-Agent-ID; default the login name),
DISPATCH_ADMIN_TOKEN (admin commands) and DISPATCH_TOKEN (the agent's own token, auth.mode tokens).
Human tables by default, --json for scripts; any error exits non-zero with the server's message.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec

from dispatch.errors import DispatchError
from dispatch.models import Agent, Schedule, Stats, Task, TaskEvent
from dispatch.sdk.client import DispatchClient, ListFilters
from dispatch.sdk.worker import (
    NUL_REPLACEMENT,
    TaskContext,
    TaskError,
    TaskLost,
    Worker,
    without_nul,
)
from dispatch.wire import DependencyBody, TaskCreate

DEFAULT_URL = "http://localhost:8600"
# How much of a failed command's stderr becomes the task's error.
STDERR_TAIL = 2000
# How much of a command's stdout becomes the task's result, by default (--max-output): well under
# the broker's default body limit (server.max_body_bytes, 1 MiB) once encoded as JSON. Beyond it
# the result is {"output": the first bytes, "truncated": true, "output_bytes": all of them}.
MAX_OUTPUT = 256 * 1024


class CliError(Exception):
    """A usage problem found after parsing (exit status 2)."""


@dataclass(frozen=True)
class Conn:
    url: str
    agent_id: str
    admin_token: str | None
    token: str | None

    def client(self, *, agent_id: str | None = None) -> DispatchClient:
        return DispatchClient(self.url, agent_id or self.agent_id,
                              admin_token=self.admin_token, token=self.token)


def _conn(args: argparse.Namespace) -> Conn:
    return Conn(
        url=args.url or os.environ.get("DISPATCH_URL") or DEFAULT_URL,
        agent_id=args.agent_id or os.environ.get("DISPATCH_AGENT_ID") or _login(),
        admin_token=args.admin_token or os.environ.get("DISPATCH_ADMIN_TOKEN") or None,
        token=args.token or os.environ.get("DISPATCH_TOKEN") or None,
    )


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"


# output

def _print_json(value: object) -> None:
    print(msgspec.json.format(msgspec.json.encode(value), indent=2).decode())


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns aligned to their widest cell; the last column is left ragged."""
    cells = [[str(h) for h in headers], *([_cell(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)] + [row[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value).replace("\n", " ")


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


TASK_COLUMNS = ("TASK_ID", "STATUS", "PRI", "AGENT", "TRY", "AGE", "TITLE")


def _age(since: datetime) -> str:
    seconds = max(0, int((datetime.now(UTC) - since).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _task_row(t: Task) -> list[object]:
    return [t.task_id, t.status, t.priority, t.assigned_agent, f"{t.retry_count}/{t.max_retries}",
            _age(t.created_at), _short(t.title, 50)]


def _task_detail(t: Task) -> str:
    fields = msgspec.structs.asdict(t)
    return table(("FIELD", "VALUE"), [(k, v) for k, v in fields.items()])


def _event_row(e: TaskEvent) -> list[object]:
    return [e.id, e.created_at, e.event, e.actor, _short(_cell(e.payload), 80)]


EVENT_COLUMNS = ("ID", "AT", "EVENT", "ACTOR", "PAYLOAD")


def _agent_row(a: Agent) -> list[object]:
    return [a.agent_id, a.status, f"{a.active_tasks}/{a.max_concurrent}",
            "yes" if a.drained else "no", a.capabilities, a.owner, a.source]


AGENT_COLUMNS = ("AGENT", "STATUS", "LOAD", "DRAINED", "CAPABILITIES", "OWNER", "SOURCE")


class Progress:
    """One self-overwriting line on stderr, when stderr is a terminal."""

    def __init__(self) -> None:
        self.live = sys.stderr.isatty()

    def show(self, text: str) -> None:
        if self.live:
            sys.stderr.write("\r\x1b[K" + text)
            sys.stderr.flush()

    def done(self) -> None:
        if self.live:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


# task commands

def _metadata(raw: str, option: str = "--metadata") -> dict[str, object]:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CliError(f"{option} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CliError(f"{option} must be a JSON object")
    return value


def _moment(raw: str) -> datetime:
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 timestamp: {raw!r}") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"needs a zone (Z or +HH:MM): {raw!r}")
    return value


def task_create(args: argparse.Namespace, conn: Conn) -> int:
    # The options' dests are TaskCreate's field names; an option left out is not sent.
    given = {name: getattr(args, name) for name in TaskCreate.__struct_fields__
             if getattr(args, name, None) is not None}
    if args.metadata is not None:
        given["metadata"] = _metadata(args.metadata)
    if args.depends_on:
        given["depends_on"] = [
            DependencyBody(task_id=dep, on_failure=mode) for dep, mode in args.depends_on]
    body = TaskCreate(**given)
    if args.count < 1:
        raise CliError("--count must be at least 1")
    if args.count > 1 and args.idempotency_key:
        raise CliError("--idempotency-key names one task: it cannot go with --count")
    created: list[Task] = []
    progress = Progress()
    with conn.client() as client:
        for i in range(args.count):
            created.append(client.create(body, idempotency_key=args.idempotency_key))
            progress.show(f"created {i + 1}/{args.count}")
    progress.done()
    if args.json:
        _print_json(created[0] if args.count == 1 else created)
    else:
        print(table(TASK_COLUMNS, [_task_row(t) for t in created]))
    return 0


def task_list(args: argparse.Namespace, conn: Conn) -> int:
    filters: ListFilters = {"limit": min(args.limit, 500)}
    if args.status:
        filters["status"] = args.status.split(",")
    for name in ("requester", "owner", "assignee", "capability"):
        if getattr(args, name) is not None:
            filters[name] = getattr(args, name)  # type: ignore[literal-required]
    tasks: list[Task] = []
    progress = Progress()
    with conn.client() as client:
        while True:
            page = client.list(**filters)
            tasks.extend(page.tasks)
            cursor = filters["cursor"] = page.next_cursor
            if not args.all or cursor is None:
                break
            progress.show(f"{len(tasks)} tasks so far")
    progress.done()
    tasks = tasks if args.all else tasks[: args.limit]
    if args.json:
        _print_json(tasks)
    else:
        print(table(TASK_COLUMNS, [_task_row(t) for t in tasks]))
        if cursor is not None and not args.all:
            print("(more: --all lists every page)", file=sys.stderr)
    return 0


def task_get(args: argparse.Namespace, conn: Conn) -> int:
    with conn.client() as client:
        task = client.get(args.task_id)
    _print_json(task) if args.json else print(_task_detail(task))
    return 0


def task_events(args: argparse.Namespace, conn: Conn) -> int:
    with conn.client() as client:
        events = client.events(args.task_id)
    if args.json:
        _print_json(events)
    else:
        print(table(EVENT_COLUMNS, [_event_row(e) for e in events]))
    return 0


def task_cancel(args: argparse.Namespace, conn: Conn) -> int:
    with conn.client() as client:
        task = client.cancel(args.task_id, args.reason, admin=conn.admin_token is not None)
    _print_json(task) if args.json else print(table(TASK_COLUMNS, [_task_row(task)]))
    return 0


def task_requeue(args: argparse.Namespace, conn: Conn) -> int:
    with conn.client() as client:
        task = client.requeue(args.task_id)
    _print_json(task) if args.json else print(table(TASK_COLUMNS, [_task_row(task)]))
    return 0


DEPENDENCY_COLUMNS = ("TASK_ID", "STATUS", "ON_FAILURE", "LETS_RUN", "TITLE", "RESULT")


def task_deps(args: argparse.Namespace, conn: Conn) -> int:
    """What a task waits for, with their results, and what waits for it."""
    with conn.client() as client:
        deps = client.dependencies(args.task_id)
    if args.json:
        _print_json(deps)
        return 0
    print(f"task {deps.task_id} is {deps.status}, waiting for {deps.waiting_on}")
    print(table(DEPENDENCY_COLUMNS, [
        [d.task_id, d.status, d.on_failure, "yes" if d.satisfied else "no", _short(d.title, 40),
         _short(_cell(d.result if d.error is None else d.error), 60)]
        for d in deps.dependencies]))
    if deps.dependents:
        print("dependents: " + ", ".join(str(d) for d in deps.dependents))
    return 0


def task_depend(args: argparse.Namespace, conn: Conn) -> int:
    with conn.client() as client:
        admin = conn.admin_token is not None
        if args.remove:
            task = client.undepend(args.task_id, args.on, admin=admin)
        else:
            task = client.depend(args.task_id, args.on, on_failure=args.on_failure, admin=admin)
    _print_json(task) if args.json else print(table(TASK_COLUMNS, [_task_row(task)]))
    return 0


def task_signal(args: argparse.Namespace, conn: Conn) -> int:
    """Resume a suspended task with a payload."""
    payload: object = None
    if args.payload is not None:
        try:
            payload = json.loads(args.payload)
        except json.JSONDecodeError as exc:
            raise CliError(f"--payload is not JSON: {exc}") from None
    with conn.client() as client:
        task = client.signal(args.task_id, payload, admin=conn.admin_token is not None)
    _print_json(task) if args.json else print(table(TASK_COLUMNS, [_task_row(task)]))
    return 0


def task_decide(args: argparse.Namespace, conn: Conn) -> int:
    """approve / reject / accept / request-changes."""
    with conn.client() as client:
        task = client.decide(args.task_id, args.decision, reason=getattr(args, "reason", None),
                             feedback=getattr(args, "feedback", None),
                             admin=conn.admin_token is not None)
    _print_json(task) if args.json else print(table(TASK_COLUMNS, [_task_row(task)]))
    return 0


def task_explain(args: argparse.Namespace, conn: Conn) -> int:
    with conn.client() as client:
        explanation = client.explain(args.task_id)
    if args.json:
        _print_json(explanation)
        return 0
    print(f"task {explanation.task_id} is {explanation.status}; owner {explanation.owner or '-'}"
          f" ({'owner-scoped' if explanation.owner_scoped else 'not owner-scoped'})")
    for note in explanation.notes:
        print(f"note: {note}")
    for reason in explanation.held_back:
        print(f"held back: {reason}")
    rows = [[c.agent_id, "yes" if c.eligible else "no", f"{c.score:.2f}",
             f"{c.active_tasks}/{c.max_concurrent}", c.status, "; ".join(c.reasons) or "-"]
            for c in explanation.candidates]
    print(table(("AGENT", "ELIGIBLE", "SCORE", "LOAD", "STATUS", "WHY_NOT"), rows))
    return 0


def task_watch(args: argparse.Namespace, conn: Conn) -> int:
    """Follow a task's history live (its event stream) until it ends: exit 0 when it completed,
    1 otherwise."""
    progress = Progress()
    with conn.client() as client:
        for event in client.follow(args.task_id):
            progress.done()
            if args.json:
                print(msgspec.json.encode(event).decode(), flush=True)
            else:
                print("  ".join(_cell(c) for c in _event_row(event)), flush=True)
            if event.event == "progress":
                percent = event.payload.get("percent")
                progress.show("running" + (f" {percent}%" if percent is not None else ""))
        task = client.get(args.task_id)
    progress.done()
    if args.json:
        print(msgspec.json.encode(task).decode(), flush=True)
    else:
        print(f"task {task.task_id} {task.status}"
              + (f": {_cell(task.result)}" if task.result is not None else "")
              + (f": {task.error}" if task.error else ""), flush=True)
    return 0 if task.status == "completed" else 1


# agent commands

def agent_list(args: argparse.Namespace, conn: Conn) -> int:
    with conn.client() as client:
        agents = client.agents()
    if args.json:
        _print_json(agents)
    else:
        print(table(AGENT_COLUMNS, [_agent_row(a) for a in agents]))
    return 0


def agent_register(args: argparse.Namespace, conn: Conn) -> int:
    admin = conn.admin_token is not None
    with conn.client(agent_id=None if admin else args.agent) as client:
        agent = client.register(
            agent_id=args.agent, capabilities=args.capability or None, owner=args.owner,
            max_concurrent=args.max_concurrent, status=args.status, admin=admin,
        )
    _print_json(agent) if args.json else print(table(AGENT_COLUMNS, [_agent_row(agent)]))
    return 0


def agent_delete(args: argparse.Namespace, conn: Conn) -> int:
    admin = conn.admin_token is not None
    with conn.client(agent_id=None if admin else args.agent) as client:
        client.remove_agent(args.agent)
    _print_json({"deleted": args.agent}) if args.json else print(f"deleted {args.agent}")
    return 0


def agent_drain(args: argparse.Namespace, conn: Conn) -> int:
    with conn.client() as client:
        agent = client.drain(args.agent, args.command_name == "drain")
    _print_json(agent) if args.json else print(table(AGENT_COLUMNS, [_agent_row(agent)]))
    return 0


# worker

async def _head(stream: asyncio.StreamReader | None, limit: int) -> tuple[bytes, int]:
    """The first `limit` bytes of the stream, and how many it had (the rest is read and dropped,
    so a chatty command neither blocks on a full pipe nor fills the worker's memory)."""
    kept, total = bytearray(), 0
    while stream is not None and (chunk := await stream.read(65536)):
        total += len(chunk)
        if len(kept) < limit:
            kept += chunk[:limit - len(kept)]
    return bytes(kept), total


async def _tail(stream: asyncio.StreamReader | None, limit: int) -> bytes:
    kept = b""
    while stream is not None and (chunk := await stream.read(65536)):
        kept = (kept + chunk)[-limit:]
    return kept


async def _feed(stdin: asyncio.StreamWriter | None, data: bytes) -> None:
    """The task's JSON on the command's stdin (a command that does not read it is no error)."""
    if stdin is None:
        return
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        stdin.write(data)
        await stdin.drain()
    stdin.close()


def command_handler(command: Sequence[str],
                    max_output: int = MAX_OUTPUT) -> Callable[[TaskContext], object]:
    """A handler that runs `command` once per task: the task's JSON on stdin, its stdout the
    result (JSON when it parses, else the text; past `max_output` bytes the first of them, noted
    as truncated), exit status 0 completes, anything else fails with the tail of stderr. NUL
    characters of either become U+FFFD (PostgreSQL text cannot hold them)."""

    async def run(ctx: TaskContext) -> object:
        env = {**os.environ, "DISPATCH_TASK_ID": str(ctx.task_id),
               "DISPATCH_TASK_LEASE": str(ctx.lease)}
        proc = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env,
        )
        try:
            (out, size), err, _ = await asyncio.gather(
                _head(proc.stdout, max_output), _tail(proc.stderr, 4 * STDERR_TAIL),
                _feed(proc.stdin, msgspec.json.encode(ctx.task)),
            )
            await proc.wait()
        except (asyncio.CancelledError, TaskLost):
            # Cancelled, or the shutdown's grace ran out: the command goes with it.
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip()[-STDERR_TAIL:]
            raise TaskError(f"exit status {proc.returncode}" + (f": {tail}" if tail else ""))
        text = out.decode(errors="replace").replace("\x00", NUL_REPLACEMENT)
        if size > max_output:
            return {"output": text, "truncated": True, "output_bytes": size}
        try:
            return without_nul(json.loads(text))
        except json.JSONDecodeError:
            return text.strip()

    return run


def worker(args: argparse.Namespace, conn: Conn) -> int:
    command = list(args.cmd)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise CliError("worker needs a command: dispatch worker -- COMMAND ARGS")
    if not (args.agent_id or os.environ.get("DISPATCH_AGENT_ID")):
        raise CliError("worker needs an agent id: --agent-id or DISPATCH_AGENT_ID")
    w = Worker(conn.url, conn.agent_id, capabilities=args.capability or None,
               concurrency=args.concurrency, token=conn.token,
               grace_seconds=args.grace, poll_seconds=args.poll,
               nats_url=args.nats or os.environ.get("DISPATCH_NATS_URL") or None)
    w.handler(command_handler(command, args.max_output))  # type: ignore[arg-type]
    print(f"worker {conn.agent_id}: running {' '.join(command)} per task "
          f"({args.concurrency} at once) from {conn.url}", file=sys.stderr, flush=True)
    w.run()
    print(f"worker {conn.agent_id}: stopped; {w.completed} completed, {w.failed} failed, "
          f"{w.released} given back",
          file=sys.stderr, flush=True)
    return 0


# top

@dataclass
class _Sample:
    at: float
    completed: int
    failed: int


def top_frame(conn: Conn, client: DispatchClient, previous: _Sample | None,
              width: int) -> tuple[list[str], _Sample]:
    """One screen of `top`: the queue, throughput since the previous frame, the agents."""
    stats: Stats = client.stats()
    agents = client.agents()
    sample = _Sample(time.monotonic(), stats.total_completed, stats.total_failed)
    rate = "-"
    if previous is not None and sample.at > previous.at:
        dt = sample.at - previous.at
        rate = (f"{(sample.completed - previous.completed) / dt:.1f} completed/s, "
                f"{(sample.failed - previous.failed) / dt:.1f} failed/s")
    q = stats.queue
    order = ("blocked", "pending", "assigned", "running", "review", "completed", "failed",
             "timed_out", "cancelled")
    lines = [
        f"dispatch top  {conn.url}  {datetime.now(UTC):%H:%M:%S} UTC  (Ctrl-C quits)",
        "",
        "QUEUE  " + "  ".join(f"{s} {q.get(s, 0)}" for s in order),
        f"oldest pending {_seconds(stats.oldest_pending_seconds)}  "
        f"wait p50 {_ms(stats.wait_ms_p50)}  p95 {_ms(stats.wait_ms_p95)}  "
        f"dead letter {stats.dead_letter}",
        f"throughput  {rate}  (last hour: {stats.completed_last_hour} completed, "
        f"{stats.failed_last_hour} failed)",
        "",
        f"AGENTS {len(agents)}",
        *table(AGENT_COLUMNS, [_agent_row(a) for a in agents]).splitlines(),
    ]
    return [_short(line, width) for line in lines], sample


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def top(args: argparse.Namespace, conn: Conn) -> int:
    with conn.client() as client:
        if args.json:
            _print_json({"stats": client.stats(), "agents": client.agents()})
            return 0
        if args.once:
            lines, _ = top_frame(conn, client, None, shutil.get_terminal_size().columns)
            print("\n".join(lines))
            return 0
        previous: _Sample | None = None
        # The alternate screen, as top(1) does: the shell's screen comes back on exit.
        sys.stdout.write("\x1b[?1049h\x1b[?25l")
        try:
            while True:
                size = shutil.get_terminal_size()
                lines, previous = top_frame(conn, client, previous, size.columns)
                # Home, each line cleared to its end, then the rest of the screen: in place,
                # without the flicker of clearing first.
                frame = "".join(line + "\x1b[K\r\n" for line in lines[: size.lines - 1])
                sys.stdout.write("\x1b[H" + frame + "\x1b[J")
                sys.stdout.flush()
                time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0
        finally:
            sys.stdout.write("\x1b[?25h\x1b[?1049l")
            sys.stdout.flush()


# schedule commands

SCHEDULE_COLUMNS = ("NAME", "CRON", "TIMEZONE", "STATE", "NEXT_FIRE", "LAST_FIRE", "FIRED",
                    "SKIPPED", "MISSED", "ERROR")
# The task options of `schedule create|update` (instead of --template), by TaskCreate's names.
TEMPLATE_OPTIONS = ("title", "description", "required_capabilities", "priority",
                    "timeout_seconds", "heartbeat_seconds", "max_retries", "owner", "metadata",
                    "concurrency_key", "rate_key", "cost")
SCHEDULE_OPTIONS = ("cron", "timezone", "overlap", "catch_up", "catch_up_limit", "paused")


def _schedule_row(s: Schedule) -> list[object]:
    return [s.name, s.cron, s.timezone, "paused" if s.paused else "active", s.next_fire_at,
            s.last_fire_at, s.fired_count, s.skipped_count, s.missed_count,
            _short(s.last_error, 60) if s.last_error else None]


def _schedule_fields(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The schedule's fields the options give (the template only from --template JSON), and the
    task options given."""
    fields = {name: getattr(args, name) for name in SCHEDULE_OPTIONS
              if getattr(args, name, None) is not None}
    options = {name: getattr(args, name) for name in TEMPLATE_OPTIONS
               if getattr(args, name, None) is not None}
    if args.template is not None:
        if options:
            raise CliError("give --template or the task options (--title, ...), not both")
        fields["template"] = _metadata(args.template, "--template")
    if "metadata" in options:
        options["metadata"] = _metadata(str(options["metadata"]))
    return fields, options


def _schedule_out(args: argparse.Namespace, schedule: Schedule) -> None:
    if args.json:
        _print_json(schedule)
    else:
        print(table(SCHEDULE_COLUMNS, [_schedule_row(schedule)]))


def schedule_create(args: argparse.Namespace, conn: Conn) -> int:
    # The server checks the fields (a bad one is its 400, naming it), as with `task create`.
    fields, options = _schedule_fields(args)
    if options:
        if "title" not in options:
            raise CliError("the task options need --title (or give --template JSON)")
        fields["template"] = options
    if "template" not in fields:
        raise CliError("a schedule needs its task: --title (and options) or --template JSON")
    with conn.client() as client:
        _schedule_out(args, client.create_schedule(args.name, **fields))
    return 0


def schedule_update(args: argparse.Namespace, conn: Conn) -> int:
    """The options given replace the schedule's; task options change those fields of its template
    (read first), --template replaces it whole."""
    fields, options = _schedule_fields(args)
    if not fields and not options:
        raise CliError("nothing to change: give --cron, --timezone, --paused, --title, ...")
    with conn.client() as client:
        if options:
            fields["template"] = {**client.get_schedule(args.name).template, **options}
        _schedule_out(args, client.update_schedule(args.name, **fields))
    return 0


def schedule_list(args: argparse.Namespace, conn: Conn) -> int:
    with conn.client() as client:
        schedules = client.list_schedules()
    if args.json:
        _print_json(schedules)
    else:
        print(table(SCHEDULE_COLUMNS, [_schedule_row(s) for s in schedules]))
    return 0


def schedule_show(args: argparse.Namespace, conn: Conn) -> int:
    """The schedule, field by field, then the newest tasks it made."""
    with conn.client() as client:
        schedule = client.get_schedule(args.name)
        tasks = client.schedule_tasks(args.name, limit=args.limit)
    if args.json:
        _print_json({"schedule": schedule, "tasks": tasks})
        return 0
    print(table(("FIELD", "VALUE"), list(msgspec.structs.asdict(schedule).items())))
    print()
    print(table(TASK_COLUMNS, [_task_row(t) for t in tasks]) if tasks else "(no tasks yet)")
    return 0


def schedule_pause(args: argparse.Namespace, conn: Conn) -> int:
    with conn.client() as client:
        if args.command_name == "pause":
            schedule = client.pause_schedule(args.name)
        else:
            schedule = client.resume_schedule(args.name)
    _schedule_out(args, schedule)
    return 0


def schedule_run(args: argparse.Namespace, conn: Conn) -> int:
    with conn.client() as client:
        task = client.run_schedule(args.name)
    _print_json(task) if args.json else print(table(TASK_COLUMNS, [_task_row(task)]))
    return 0


def schedule_delete(args: argparse.Namespace, conn: Conn) -> int:
    with conn.client() as client:
        client.delete_schedule(args.name)
    _print_json({"deleted": args.name}) if args.json else print(f"deleted {args.name}")
    return 0


def _add_schedule_options(parser: argparse.ArgumentParser, *, create: bool) -> None:
    parser.add_argument("name")
    parser.add_argument("--cron", required=create,
                        help="5 fields, 6 with seconds last, or an alias such as @hourly")
    parser.add_argument("--timezone", help="an IANA zone" + (" (default UTC)" if create else ""))
    parser.add_argument("--overlap", choices=("skip", "allow"),
                        help="skip: no fire while the last fire's task is unfinished"
                             + (" (default)" if create else ""))
    parser.add_argument("--catch-up", choices=("none", "latest", "all"),
                        help="the fires missed while no replica ran"
                             + (" (default latest)" if create else ""))
    parser.add_argument("--catch-up-limit", type=int, metavar="N")
    state = parser.add_mutually_exclusive_group()
    state.add_argument("--paused", action="store_const", const=True)
    if not create:
        state.add_argument("--active", action="store_const", const=False, dest="paused",
                           help="resume it")
    parser.add_argument("--template", metavar="JSON",
                        help="the task, as the body of a task create"
                             + ("" if create else " (replaces the template whole)"))
    parser.add_argument("--title", help="the task's title (instead of --template)")
    parser.add_argument("--description")
    parser.add_argument("-c", "--capability", action="append", dest="required_capabilities",
                        help="a required capability (repeatable)")
    parser.add_argument("--priority", type=int)
    parser.add_argument("--timeout", type=int, metavar="SECONDS", dest="timeout_seconds")
    parser.add_argument("--heartbeat", type=int, metavar="SECONDS", dest="heartbeat_seconds")
    parser.add_argument("--max-retries", type=int)
    parser.add_argument("--owner")
    parser.add_argument("--metadata", metavar="JSON", help="a JSON object")
    parser.add_argument("--concurrency-key")
    parser.add_argument("--rate-key")
    parser.add_argument("--cost", type=int)


# the parser

def add_client_options(parser: argparse.ArgumentParser, *, leaf: bool) -> None:
    """The client's global options. Given to the top-level parser (`dispatch --url U task list`)
    and to each command (`dispatch task list --url U`); a command's copy leaves an option it was
    not given alone (SUPPRESS), so the value from before the command stands."""
    none: object = argparse.SUPPRESS if leaf else None
    parser.add_argument("--url", default=none,
                        help="the API (else $DISPATCH_URL, else " + DEFAULT_URL + ")")
    parser.add_argument("--agent-id", default=none,
                        help="X-Agent-ID (else $DISPATCH_AGENT_ID, else the login)")
    parser.add_argument("--admin-token", default=none,
                        help="for admin commands (else $DISPATCH_ADMIN_TOKEN)")
    parser.add_argument("--token", default=none,
                        help="the agent's own token (else $DISPATCH_TOKEN)")
    parser.add_argument("--json", action="store_true",
                        default=argparse.SUPPRESS if leaf else False,
                        help="JSON output, for scripts")


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    add_client_options(common, leaf=True)
    return common


def _task_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a task id (a UUID): {raw!r}") from None


def _dependency(raw: str) -> tuple[uuid.UUID, str]:
    """TASK_ID or TASK_ID:run (or :cancel, the default)."""
    task_id, _, mode = raw.partition(":")
    if mode not in ("", "cancel", "run"):
        raise argparse.ArgumentTypeError(f"after the task id, :run or :cancel, not {mode!r}")
    return _task_id(task_id), mode or "cancel"


Command = Callable[[argparse.Namespace, Conn], int]


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The client commands, beside the server's serve and migrate."""
    common = _common()

    task = sub.add_parser("task", help="create, list, follow and manage tasks")
    tasks = task.add_subparsers(dest="command_name", required=True, metavar="ACTION")
    create = tasks.add_parser("create", parents=[common], help="create a task")
    create.add_argument("title")
    create.add_argument("--description")
    create.add_argument("-c", "--capability", action="append", dest="required_capabilities",
                        help="a required capability (repeatable)")
    create.add_argument("--priority", type=int)
    create.add_argument("--timeout", type=int, metavar="SECONDS", dest="timeout_seconds")
    create.add_argument("--heartbeat", type=int, metavar="SECONDS", dest="heartbeat_seconds")
    create.add_argument("--max-retries", type=int)
    create.add_argument("--owner")
    create.add_argument("--metadata", metavar="JSON", help="a JSON object")
    create.add_argument("--parent", type=_task_id, metavar="TASK_ID", dest="parent_task_id")
    create.add_argument("--approval", choices=("before_start", "review", "both"),
                        help="before_start: wait for approve; review: its result waits for"
                             " accept (or request-changes); both")
    create.add_argument("--depends-on", type=_dependency, action="append", metavar="TASK_ID[:run]",
                        help="wait until this task completes (repeatable); with :run, run even"
                             " if it fails or is cancelled (else that cancels this one)")
    create.add_argument("--available-at", type=_moment, metavar="TIME",
                        help="not before this RFC 3339 time, e.g. 2030-01-01T09:00:00Z")
    create.add_argument("--source")
    create.add_argument("--concurrency-key", help="share the key's cap on running tasks")
    create.add_argument("--rate-key", help="take --cost tokens from the key's bucket")
    create.add_argument("--cost", type=int, help="tokens from the rate key's bucket (default 1)")
    create.add_argument("--idempotency-key")
    create.add_argument("--count", type=int, default=1, help="create N such tasks")
    create.set_defaults(run=task_create)

    listing = tasks.add_parser("list", parents=[common], help="list tasks")
    listing.add_argument("--status", help="comma list, e.g. pending,running")
    listing.add_argument("--requester")
    listing.add_argument("--owner")
    listing.add_argument("--assignee")
    listing.add_argument("--capability")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--all", action="store_true", help="follow every page")
    listing.set_defaults(run=task_list)

    for name, run, text in (("get", task_get, "one task"), ("events", task_events, "its history"),
                            ("requeue", task_requeue, "admin: start a dead task over"),
                            ("explain", task_explain, "admin: who could run it, and why not")):
        one = tasks.add_parser(name, parents=[common], help=text)
        one.add_argument("task_id", type=_task_id)
        one.set_defaults(run=run)
    deps = tasks.add_parser("deps", parents=[common],
                            help="what a task waits for, with their results, and its dependents")
    deps.add_argument("task_id", type=_task_id)
    deps.set_defaults(run=task_deps)
    depend = tasks.add_parser("depend", parents=[common],
                              help="make a waiting task depend on another (or --remove it)")
    depend.add_argument("task_id", type=_task_id)
    depend.add_argument("on", type=_task_id, metavar="DEPENDENCY_ID")
    depend.add_argument("--on-failure", choices=("cancel", "run"), default="cancel")
    depend.add_argument("--remove", action="store_true", help="stop depending on it")
    depend.set_defaults(run=task_depend)
    for decision, text in (("approve", "let a task waiting for approval run"),
                           ("reject", "cancel a task waiting for approval"),
                           ("accept", "accept the result of a task in review"),
                           ("request-changes", "send a task in review back, with feedback")):
        decide = tasks.add_parser(decision, parents=[common], help=text)
        decide.add_argument("task_id", type=_task_id)
        if decision == "reject":
            decide.add_argument("--reason")
        if decision == "request-changes":
            decide.add_argument("--feedback", required=True, help="what to change")
        decide.set_defaults(run=task_decide, decision=decision)
    signal = tasks.add_parser("signal", parents=[common],
                              help="resume a suspended task, with a payload for its agent")
    signal.add_argument("task_id", type=_task_id)
    signal.add_argument("--payload", metavar="JSON", help="any JSON value")
    signal.set_defaults(run=task_signal)
    cancel = tasks.add_parser("cancel", parents=[common], help="cancel a task")
    cancel.add_argument("task_id", type=_task_id)
    cancel.add_argument("--reason")
    cancel.set_defaults(run=task_cancel)
    watch = tasks.add_parser("watch", parents=[common],
                             help="follow a task live until it ends (exit 0 if it completed)")
    watch.add_argument("task_id", type=_task_id)
    watch.set_defaults(run=task_watch)

    agent = sub.add_parser("agent", help="list, register, drain, delete agents")
    agents = agent.add_subparsers(dest="command_name", required=True, metavar="ACTION")
    agents.add_parser("list", parents=[common], help="admin: the directory").set_defaults(
        run=agent_list)
    register = agents.add_parser("register", parents=[common], help="register an agent")
    register.add_argument("agent")
    register.add_argument("-c", "--capability", action="append")
    register.add_argument("--max-concurrent", type=int)
    register.add_argument("--owner", help="admin only")
    register.add_argument("--status")
    register.set_defaults(run=agent_register)
    for name in ("drain", "undrain"):
        one = agents.add_parser(name, parents=[common], help=f"admin: {name} an agent")
        one.add_argument("agent")
        one.set_defaults(run=agent_drain)
    gone = agents.add_parser("delete", parents=[common],
                             help="remove an agent with no active tasks (admin, or itself)")
    gone.add_argument("agent")
    gone.set_defaults(run=agent_delete)

    work = sub.add_parser("worker", parents=[common],
                          help="run a command per task: dispatch worker -- COMMAND ARGS")
    work.add_argument("-c", "--capability", action="append")
    work.add_argument("--concurrency", type=int, default=1)
    work.add_argument("--grace", type=float, default=30.0,
                      help="seconds running commands get on SIGTERM before they are killed")
    work.add_argument("--poll", type=float, default=5.0, help="long-poll wait, seconds")
    work.add_argument("--max-output", type=int, default=MAX_OUTPUT, metavar="BYTES",
                      help="stdout kept as the result; past it the first BYTES, marked truncated"
                           f" (default {MAX_OUTPUT})")
    work.add_argument("--nats", metavar="URL",
                      help="push mode: hear of assignments from NATS (else $DISPATCH_NATS_URL;"
                           " needs the push extra)")
    work.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS")
    work.set_defaults(run=worker)

    schedule = sub.add_parser("schedule", help="admin: recurring tasks from cron schedules")
    schedules = schedule.add_subparsers(dest="command_name", required=True, metavar="ACTION")
    schedules.add_parser("list", parents=[common], help="every schedule").set_defaults(
        run=schedule_list)
    show = schedules.add_parser("show", parents=[common],
                                help="one schedule and the newest tasks it made")
    show.add_argument("name")
    show.add_argument("--limit", type=int, default=20)
    show.set_defaults(run=schedule_show)
    make = schedules.add_parser("create", parents=[common], help="create a schedule")
    _add_schedule_options(make, create=True)
    make.set_defaults(run=schedule_create)
    change = schedules.add_parser("update", parents=[common],
                                  help="change a schedule (a new timing applies from now on)")
    _add_schedule_options(change, create=False)
    change.set_defaults(run=schedule_update)
    for name, run, text in (("pause", schedule_pause, "no fires until resumed"),
                            ("resume", schedule_pause, "fire again, from now on"),
                            ("run", schedule_run, "one task now, outside the timing"),
                            ("delete", schedule_delete, "delete (its tasks stay)")):
        one = schedules.add_parser(name, parents=[common], help=text)
        one.add_argument("name")
        one.set_defaults(run=run)

    live = sub.add_parser("top", parents=[common],
                          help="admin: a live view of the queue, throughput and agents")
    live.add_argument("--interval", type=float, default=1.0)
    live.add_argument("--once", action="store_true", help="print one frame and exit")
    live.set_defaults(run=top)


def run(args: argparse.Namespace) -> int:
    """Runs a client command; errors become a message on stderr and a non-zero status."""
    command: Command = args.run
    conn = _conn(args)
    try:
        return command(args, conn)
    except CliError as exc:
        print(f"dispatch: {exc}", file=sys.stderr)
        return 2
    except DispatchError as exc:
        hint = ""
        if exc.status == 401 and "admin token" in exc.message and conn.admin_token is None:
            hint = "; set DISPATCH_ADMIN_TOKEN (or --admin-token) to the server's admin token"
        print(f"dispatch: {exc.message} (HTTP {exc.status}){hint}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"dispatch: cannot reach the API at {conn.url} (--url or DISPATCH_URL): {exc}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
