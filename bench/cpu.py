"""CPU seconds by process group (from /proc), to see who spends the 2 cores during a phase."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float, float] | None:
    """(ppid, user+system CPU seconds of the process, of its exited and reaped children)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return (
        int(fields[1]),
        (int(fields[11]) + int(fields[12])) / _TICK,
        (int(fields[13]) + int(fields[14])) / _TICK,
    )


def postmaster_pid(pgdata: Path | None, backend_pid: int | None = None) -> int | None:
    """The postmaster of the benchmark's server: from its data directory when we started it,
    else, for a server on this machine, the parent of one of its backends (None when remote)."""
    if pgdata is not None:
        try:
            return int((pgdata / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
    if backend_pid is not None:
        st = _stat(backend_pid)
        return st[0] if st else None
    return None


def postgres_seconds(postmaster: int | None) -> float:
    """CPU of the postmaster, its live children and the children it has reaped (backends of
    closed connections)."""
    if postmaster is None:
        return 0.0
    own = _stat(postmaster)
    if own is None:
        return 0.0
    total = own[1] + own[2]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st and st[0] == postmaster:
                total += st[1]
    return total


def children(pid: int) -> list[int]:
    """The live child processes of pid (the workers of `serve --workers N`)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st and st[0] == pid:
                out.append(int(entry.name))
    return out


def tree_seconds(pid: int) -> float:
    """CPU of a process, its live children and the children it has reaped."""
    own = _stat(pid)
    if own is None:
        return 0.0
    return own[1] + own[2] + sum(process_seconds(c) for c in children(pid))


def process_seconds(pid: int) -> float:
    st = _stat(pid)
    return st[1] if st else 0.0


def self_seconds() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class CpuSplit:
    """CPU seconds spent during a phase by the serve process, Postgres and the load generator."""

    wall: float
    serve: float
    postgres: float
    client: float

    def describe(self, n: int) -> str:
        per = 1e6 / n if n else 0.0
        if not self.serve:
            return (
                f"CPU over {self.wall:.1f} s wall: postgres {self.postgres:.1f} s, client process "
                f"{self.client:.1f} s (per task {self.postgres * per:.0f} / "
                f"{self.client * per:.0f} us)"
            )
        return (
            f"CPU over {self.wall:.1f} s wall: serve {self.serve:.1f} s, postgres "
            f"{self.postgres:.1f} s, load generator {self.client:.1f} s "
            f"(per task: {self.serve * per:.0f} / {self.postgres * per:.0f} / "
            f"{self.client * per:.0f} us)"
        )


class CpuMeter:
    """CPU seconds of Postgres and of this process (the in-process engine or peer) over a phase."""

    def __init__(self, postmaster: int | None) -> None:
        self.pm = postmaster
        self.t0 = time.perf_counter()
        self.pg0 = postgres_seconds(self.pm)
        self.me0 = self_seconds()

    def stop(self) -> CpuSplit:
        return CpuSplit(
            time.perf_counter() - self.t0, 0.0, postgres_seconds(self.pm) - self.pg0,
            self_seconds() - self.me0,
        )
