"""A network partition that leaves the database's TCP connections half-open: no packet passes
and no reset arrives, so nothing but a timeout can tell. What must hold: a request waiting on
such a connection is answered 503 within Dispatch's bound (about 30 s, not the kernel's two
hours), the LISTEN connection notices and comes back, and both serve again once the network
does, without a restart.

It needs a network namespace of its own, so that taking its loopback down touches nothing else
on the machine: root, `unshare` and `ip` (iproute2), and the distribution's PostgreSQL, which
listens on TCP (tests/pgdist.py). Elsewhere it is skipped, saying which is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import pgdist

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root for a network namespace of its own (unshare --net)"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (util-linux / iproute2)"
    try:
        pgdist.bindir()
    except pgdist.DistributionMissing as exc:
        return f"needs the distribution's PostgreSQL: {exc}"
    return None


def test_a_half_open_database_connection_is_given_up_on_and_replaced() -> None:
    if (why := missing()) is not None:
        pytest.skip(why)
    # A PID namespace too, whose first process is the scenario: when it ends, however it ends,
    # the kernel ends its PostgreSQL with it.
    proc = subprocess.run(
        ["unshare", "--net", "--pid", "--fork", "--kill-child", sys.executable, "-m",
         "tests.chaos.half_open"],
        cwd=ROOT, capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["woken_before"] is True, seen
    # The request waiting on the dead connection: a 503, not an answer from nowhere nor a hang.
    assert seen["request"] == "unavailable (503)", seen
    assert seen["listener_lost_seconds"] is not None, seen
    # Once the network is back, both serve again without a restart.
    assert seen["request_after_seconds"] is not None, seen
    assert seen["woken_after_seconds"] is not None, seen
