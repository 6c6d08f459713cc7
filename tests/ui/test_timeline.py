"""Every event the database writes has its own line on the task page's timeline: a new event
that the timeline would only show as raw keys fails here."""

from __future__ import annotations

import re
from pathlib import Path

from dispatch.ui import timeline

SCHEMA = Path(timeline.__file__).parents[1] / "sql" / "schema"
# The generic one written for a status change made by plain SQL: drawn from its from/to.
WRITTEN = re.compile(r"event_write\([^,]+,\s*'([a-z_]+)'")


def test_every_event_the_schema_writes_has_a_summary_and_a_kind() -> None:
    written = {m for f in SCHEMA.glob("*.sql") for m in WRITTEN.findall(f.read_text())}
    assert {"created", "failed", "dlq", "progress", "signalled"} <= written  # the scan works
    assert written - set(timeline.SUMMARIES) == set()
    bad = {e for e in written if timeline.KINDS.get(e) == "bad"}
    assert {"failed", "dlq", "timeout", "rejected", "cancelled"} <= bad
