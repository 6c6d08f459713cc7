"""What each phase measured; the report renders these."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.cpu import CpuSplit
from bench.pg import Cost


@dataclass
class Throughput:
    """One system's run: N tasks enqueued by single-row calls, then drained to completion."""

    system: str
    n: int
    enqueue_s: float
    drain_s: float
    cost: Cost | None = None
    settings: str = ""
    claim_ms: list[float] = field(default_factory=list)
    cpu: CpuSplit | None = None

    @property
    def enqueue_rate(self) -> float:
        return self.n / self.enqueue_s if self.enqueue_s else 0.0

    @property
    def drain_rate(self) -> float:
        return self.n / self.drain_s if self.drain_s else 0.0

    @property
    def lifecycle_rate(self) -> float:
        total = self.enqueue_s + self.drain_s
        return self.n / total if total else 0.0


@dataclass
class Unavailable:
    """A row that could not be measured, and why."""

    what: str
    why: str
