"""The dashboard's task list: what a query string asks for (filters, search, order), read the same
way by the page, its live topic and its bulk actions, so the three always mean the same tasks."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode

from dispatch.errors import InvalidInput
from dispatch.models import TaskFilter, TaskStatus
from dispatch.wire import parse_statuses

# Filter values longer than this are no filter anyone types.
MAX_FILTER_LENGTH = 256
FIELDS = ("capability", "requester", "owner", "assignee", "q", "id", "meta")
ORDERS = ("newest", "oldest")
TOPIC = "tasks?"
# A bulk action selects at most this many tasks per request, applied BATCH to a transaction.
BULK_LIMIT = 10_000
BULK_BATCH = 100
FAILURES = {TaskStatus.FAILED, TaskStatus.TIMED_OUT}
HEX_PREFIX = re.compile(r"^[0-9a-f-]{1,36}\Z")


@dataclass(frozen=True)
class ListQuery:
    """One listing: the values as the form shows them, the filter and the order."""

    values: dict[str, str]
    statuses: list[str]
    filters: TaskFilter
    order: str

    @property
    def shows_errors(self) -> bool:
        return bool(self.filters.statuses) and bool(FAILURES & set(self.filters.statuses or []))

    def query(self, **extra: str) -> str:
        """The canonical query string (the live topic's, and the links')."""
        pairs = [(k, v) for k, v in sorted(self.values.items()) if v]
        if self.statuses:
            pairs.append(("status", ",".join(self.statuses)))
        if self.order != ORDERS[0]:
            pairs.append(("order", self.order))
        return urlencode(pairs + sorted(extra.items()))


def value(name: str, raw: str | None) -> str | None:
    """A query value, stripped; None when empty; InvalidInput when overlong or with NUL."""
    if raw is None or not raw.strip():
        return None
    text = raw.strip()
    if len(text) > MAX_FILTER_LENGTH or "\x00" in text:
        raise InvalidInput(f"{name}: at most {MAX_FILTER_LENGTH} characters, no NUL", field=name)
    return text


def _metadata(raw: str) -> dict[str, object]:
    """key=value: the value as JSON when it reads as JSON (42, true, "x"), else as text."""
    key, sep, text = raw.partition("=")
    if not sep or not key.strip():
        raise InvalidInput("meta: key=value, e.g. team=search or attempt=3", field="meta")
    try:
        value: object = json.loads(text)
    except ValueError:
        value = text
    return {key.strip(): value}


def parse(get_all: Callable[[str], list[str]]) -> ListQuery:
    """The listing a query (or a bulk form) asks for; InvalidInput names a bad field."""
    values = {name: value(name, last[-1] if (last := get_all(name)) else None)
              for name in FIELDS}
    raw_statuses = [s for raw in get_all("status") for s in raw.split(",") if s.strip()]
    if len(raw_statuses) > len(TaskStatus) * 2:
        raise InvalidInput("status: too many values", field="status")
    statuses = sorted({s.value for s in parse_statuses(",".join(raw_statuses))}) \
        if raw_statuses else []
    order = (get_all("order") or [ORDERS[0]])[-1] or ORDERS[0]
    if order not in ORDERS:
        raise InvalidInput("order: newest or oldest", field="order")
    prefix = values["id"]
    if prefix is not None:
        prefix = prefix.lower()
        if not HEX_PREFIX.match(prefix):
            raise InvalidInput("id: the start of a task id (hexadecimal digits and -)",
                               field="id")
    filters = TaskFilter(
        statuses=[TaskStatus(s) for s in statuses] or None,
        requester=values["requester"],
        owner=values["owner"],
        assignee=values["assignee"],
        capability=values["capability"],
        title=values["q"],
        id_prefix=prefix,
        metadata=_metadata(values["meta"]) if values["meta"] else None,
    )
    shown = {k: v for k, v in values.items() if v is not None}
    return ListQuery(values=shown, statuses=statuses, filters=filters, order=order)


def from_topic(topic: str) -> ListQuery:
    params = parse_qs(topic.removeprefix(TOPIC), keep_blank_values=False)
    return parse(lambda name: params.get(name, []))
