"""A task's timeline as the task page draws it: each event's essentials in one line (who, what
changed, the error, the progress message), a kind that colours it, and runs of progress reports
folded into one entry that opens to list them."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from dispatch.models import TaskEvent

# How each event is drawn: `bad` for what went wrong, `good` for what went right, `wait` for a
# task held (by a person, a dependency, a retry's delay), `progress`, and `plain` for the rest.
KINDS = {
    "failed": "bad", "dlq": "bad", "timeout": "bad", "rejected": "bad", "cancelled": "bad",
    "unmatched": "bad",
    "completed": "good", "accepted": "good", "approved": "good", "unblocked": "good",
    "signalled": "good",
    "blocked": "wait", "suspended": "wait", "in_review": "wait", "changes_requested": "wait",
    "retry": "wait", "released": "wait", "reassigned": "wait", "schedule_skipped": "wait",
    "progress": "progress",
}
# A value shown inline is cut here; the whole payload stays one click away.
SHOWN = 300


@dataclass
class Entry:
    """One line of the timeline; `folded` holds the progress reports of a folded run."""

    event: str
    actor: str
    created_at: datetime
    kind: str
    summary: str
    error: str | None = None
    payload: Mapping[str, object] = field(default_factory=dict)
    folded: list[Entry] = field(default_factory=list)


def _text(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
    return text if len(text) <= SHOWN else text[: SHOWN - 1] + "…"


def _percent(value: object) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:g} %"
    return ""


def _progress(p: Mapping[str, object]) -> str:
    parts = [_percent(p.get("percent")), _text(p["message"]) if p.get("message") else ""]
    return " ".join(x for x in parts if x) or "a report with no message"


def _assigned(p: Mapping[str, object]) -> str:
    text = f"to {p.get('assigned_agent')}"
    if p.get("attempt") is not None:
        text += f", attempt {p['attempt']}"
    if p.get("score") is not None:
        text += f", score {_text(p['score'])}"
    if p.get("lease") is not None:
        text += f", lease {p['lease']}"
    return text


def _retry(p: Mapping[str, object]) -> str:
    text = f"attempt {p.get('retry_count')} failed"
    if p.get("available_at"):
        text += f"; next try from {_text(p['available_at'])}"
    return text


def _timeout(p: Mapping[str, object]) -> str:
    text = f"while {p.get('timed_out_in_state')}"
    if p.get("assigned_agent"):
        text += f" on {p['assigned_agent']}"
    if p.get("reason"):
        text += f" ({p['reason']})"
    return text


def _cancelled(p: Mapping[str, object]) -> str:
    if p.get("dependency"):
        return f"dependency {p['dependency']} {p.get('dependency_status') or 'failed'}"
    return _text(p["reason"]) if p.get("reason") else "no reason given"


def _blocked(p: Mapping[str, object]) -> str:
    waits = [f"{n} dependencies" if n != 1 else "1 dependency"
             for n in [len(p.get("waiting_for") or [])] if n]  # type: ignore[arg-type]
    if p.get("approval"):
        waits.append("an approval")
    return "waiting for " + (" and ".join(waits) or "its dependencies")


def _via_sql(p: Mapping[str, object]) -> str:
    return f"{p.get('from')} → {p.get('to')} by SQL"


# Each event's line from its payload (events not listed show their payload's keys and values).
SUMMARIES: dict[str, Callable[[Mapping[str, object]], str]] = {
    "created": lambda p: "needs " + (", ".join(p.get("required_capabilities") or [])  # type: ignore[arg-type]
                                     or "any agent")
                         + (f", owner {p['owner']}" if p.get("owner") else "")
                         + f", priority {p.get('priority')}",
    "assigned": _assigned,
    "started": lambda p: f"on {p.get('assigned_agent')}",
    "progress": _progress,
    "completed": lambda p: (f"by {p['assigned_agent']}" if p.get("assigned_agent") else "")
                           + (f", reviewed by {p['reviewed_by']}" if p.get("reviewed_by") else "")
                           + (" (by hand)" if p.get("manual") else ""),
    "in_review": lambda p: f"result of {p.get('assigned_agent')} waits for a review",
    "failed": lambda p: f"on {p.get('assigned_agent')}"
                        + ("" if p.get("retry_eligible", True) else ", not to be retried"),
    "retry": _retry,
    "dlq": lambda p: f"dead letter: {p.get('reason')} ("
                     + ("no retries allowed" if not p.get("max_retries")
                        else f"{p.get('retry_count')} of {p.get('max_retries')} retries") + ")",
    "timeout": _timeout,
    "released": lambda p: f"given back by {p.get('previous_agent')}"
                          + (f": {_text(p['reason'])}" if p.get("reason") else ""),
    "reassigned": lambda p: f"taken from {p.get('previous_agent')}"
                            + (f": {_text(p['reason'])}" if p.get("reason") else ""),
    "cancelled": _cancelled,
    "requeued": lambda p: f"from {p.get('previous_status')}"
                          + (f", waits on {p['waiting_on']}" if p.get("waiting_on") else ""),
    "blocked": _blocked,
    "unblocked": lambda p: (f"dependency {p['last_dependency']} done"
                            if p.get("last_dependency") else "nothing left to wait for"),
    "approved": lambda p: "",
    "accepted": lambda p: "",
    "rejected": lambda p: _text(p["reason"]) if p.get("reason") else "no reason given",
    "changes_requested": lambda p: _text(p.get("feedback") or ""),
    "suspended": lambda p: f"waits for {_text(p.get('waiting_for') or 'a signal')}",
    "signalled": lambda p: f"{_text(p.get('waiting_for') or 'signal')}: "
                           f"{_text(p.get('payload'))}",
    "unmatched": lambda p: "no agent in the directory could take it",
    "updated": lambda p: ", ".join(f"{k} {_text(v)}" for k, v in sorted(p.items())),
    "dependency_added": lambda p: f"waits for {p.get('depends_on')} (on failure: "
                                  f"{p.get('on_failure')})",
    "dependency_removed": lambda p: f"no longer waits for {p.get('depends_on')}",
    "schedule_fired": lambda p: f"schedule {p.get('schedule')}"
                                + (" (run now)" if p.get("run_now") else ""),
    "schedule_skipped": lambda p: f"schedule {p.get('schedule')} skipped a fire: "
                                  "the last run had not finished",
}
def entry(e: TaskEvent) -> Entry:
    p = e.payload or {}
    if p.get("via") == "sql":
        summary = _via_sql(p)
    else:
        describe = SUMMARIES.get(e.event)
        summary = describe(p) if describe is not None else ", ".join(
            f"{k} {_text(v)}" for k, v in sorted(p.items()))
    error = p.get("error") if e.event == "failed" else None
    return Entry(
        event=e.event, actor=e.actor, created_at=e.created_at,
        kind=KINDS.get(e.event, "plain"), summary=summary,
        error=_text(error) if error else None, payload=p,
    )


def entries(events: Iterable[TaskEvent]) -> list[Entry]:
    """The timeline: one entry per event, consecutive progress reports folded into one whose
    summary is the last report's (the entry lists them all, oldest first)."""
    out: list[Entry] = []
    for e in events:
        line = entry(e)
        last = out[-1] if out else None
        if line.event == "progress" and last is not None and last.event == "progress":
            if not last.folded:
                last.folded.append(Entry(**{**last.__dict__, "folded": []}))
            last.folded.append(line)
            last.summary, last.created_at, last.actor = line.summary, line.created_at, line.actor
            last.payload = line.payload
            continue
        out.append(line)
    return out
