"""Replays a task event history to check the invariants a run must keep: no task held by two
agents at once, no agent above its limit, no report from an agent that does not hold the task."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Replay:
    peak: int = 0  # most tasks one agent held at once
    assignments: int = 0
    double: list[str] = field(default_factory=list)  # a task assigned while someone held it
    over_limit: list[str] = field(default_factory=list)  # an agent above its limit
    foreign_reports: list[str] = field(default_factory=list)  # a report from a non-holder


def replay(events: Iterable[Mapping[str, Any]], limit: int) -> Replay:
    """Walk the history in id order. Ids are taken under the task's row lock, so per task they
    follow the order of its changes; and a slot of an agent is taken only once the end of its last
    holder is committed, so the end's id comes before the next holder's assignment: counted in id
    order, an agent's active tasks are never more than its slots."""
    out = Replay()
    holder: dict[Any, str | None] = {}
    active: Counter[str] = Counter()
    for e in events:
        task, kind, payload = e["task_id"], e["event"], e["payload"]
        if kind == "assigned":
            if holder.get(task) is not None:
                out.double.append(f"task {task} assigned while held by {holder[task]}")
            agent = payload["assigned_agent"]
            holder[task] = agent
            active[agent] += 1
            out.assignments += 1
            if active[agent] > limit:
                out.over_limit.append(f"{agent} held {active[agent]} tasks (limit {limit})")
            out.peak = max(out.peak, active[agent])
        elif kind in ("started", "progress", "failed", "completed") and not payload.get("manual"):
            if e["actor"] != holder.get(task):
                out.foreign_reports.append(f"{kind} of {task} by {e['actor']}, not its holder")
            if kind == "completed" and holder.get(task) is not None:
                active[holder[task]] -= 1  # type: ignore[index]
                holder[task] = None
        elif kind in ("retry", "dlq", "reassigned", "cancelled", "completed") \
                and holder.get(task) is not None:
            active[holder[task]] -= 1  # type: ignore[index]
            holder[task] = None
    return out
