"""The directory sync loop: every directory.refresh_ms, one replica at a time (advisory lock),
PromptForge personas -> capabilities, Warren -> status and policy, Alexandria -> device ownership,
written into dispatch.agents / dispatch.agent_owners; then entries not refreshed for
directory.stale_ms become `unknown`. A service that fails keeps the last known directory; the
failure shows in health() and the metrics. Nothing here is on the assignment hot path."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Any

from prometheus_client import Counter, Gauge

from dispatch.broker import Broker
from dispatch.integrations import describe
from dispatch.integrations.alexandria import AlexandriaClient
from dispatch.integrations.promptforge import PromptForgeClient
from dispatch.integrations.warren import WarrenAgent, WarrenClient, agent_status
from dispatch.loop import BackgroundLoop
from dispatch.metrics import Metrics
from dispatch.wire import AGENT_ID_RE

log = logging.getLogger(__name__)

DIRECTORY_LOCK_KEY = 0x44495302  # any constant shared by every replica
SERVICES = ("warren", "promptforge", "alexandria")


class DirectorySync(BackgroundLoop):
    """run_once() is one refresh (tests call it directly, with an injected now)."""

    name = "directory"

    def __init__(
        self,
        broker: Broker,
        *,
        warren: WarrenClient | None = None,
        promptforge: PromptForgeClient | None = None,
        alexandria: AlexandriaClient | None = None,
        refresh_ms: int = 5000,
        stale_ms: int = 60000,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(interval=refresh_ms / 1000.0)
        self.agents = broker.agents
        self.warren = warren
        self.promptforge = promptforge
        self.alexandria = alexandria
        self.stale_ms = stale_ms
        # service -> "ok" | "down: <reason>" | "disabled" | "standby" (another replica syncs)
        self.services: dict[str, str] = {
            "warren": "standby" if warren else "disabled",
            "promptforge": "standby" if promptforge else "disabled",
            "alexandria": "standby" if alexandria else "disabled",
        }
        self._failures: Counter | None = None
        self._up: Gauge | None = None
        if metrics is not None:
            self._failures = Counter(
                "dispatch_directory_sync_failures_total",
                "Directory refreshes in which an external service failed", ["service"],
                registry=metrics.registry,
            )
            self._up = Gauge(
                "dispatch_directory_service_up",
                "1 when the external service answered the last directory refresh", ["service"],
                registry=metrics.registry,
                # Whichever worker refreshed last (one holds the lock at a time) says.
                multiprocess_mode="livemostrecent",
            )

    async def _close(self) -> None:
        for client in (self.warren, self.promptforge, self.alexandria):
            if client is not None:
                await client.close()

    def health(self) -> dict[str, object]:
        return {
            "directory": "ok" if self.last_error is None else f"error: {self.last_error}",
            **self.services,
        }

    async def run_once(self, now: datetime | None = None) -> bool:
        """One refresh; False when another replica holds the lock (it refreshes instead)."""
        async with self.agents.exclusive(DIRECTORY_LOCK_KEY) as mine:
            if not mine:
                return False
            w, pf, ax = self.warren, self.promptforge, self.alexandria
            warren, personas, owners = await asyncio.gather(
                self._fetch("warren", w.agents() if w else None),
                self._fetch("promptforge", pf.personas() if pf else None),
                self._fetch("alexandria", ax.ownership() if ax else None),
            )
            entries = self._entries(warren, personas)
            async with self.agents.transaction() as conn:
                if entries:
                    await self.agents.sync(entries, now=now, conn=conn)
                if owners is not None:
                    await self.agents.owners_sync(owners, "alexandria", now=now, conn=conn)
            marked = await self.agents.mark_stale(self.stale_ms, now=now)
            if marked:
                log.warning(
                    "%d agents not refreshed for %d ms are now unknown", marked, self.stale_ms
                )
        return True

    async def _fetch(self, service: str, call: Any) -> Any:
        if call is None:
            return None
        try:
            result = await call
        except Exception as exc:  # any failure: keep the last known directory
            reason = describe(exc)
            if self.services.get(service) != f"down: {reason}":
                log.warning("%s unavailable, keeping the last known directory: %s", service, reason)
            self.services[service] = f"down: {reason}"
            if self._failures is not None and self._up is not None:
                self._failures.labels(service=service).inc()
                self._up.labels(service=service).set(0)
            return None
        if self.services.get(service, "").startswith("down"):
            log.info("%s is back", service)
        self.services[service] = "ok"
        if self._up is not None:
            self._up.labels(service=service).set(1)
        return result

    def _entries(
        self, warren: list[WarrenAgent] | None, personas: dict[str, list[str]] | None
    ) -> list[dict[str, object]]:
        entries: dict[str, dict[str, object]] = {}
        for a in warren or []:
            if not AGENT_ID_RE.match(a.name):
                log.warning("ignoring Warren agent with an invalid id: %r", a.name)
                continue
            entries[a.name] = {
                "agent_id": a.name, "status": agent_status(a.state), "policy": a.policy,
                "source": "warren", "seen": True,
            }
        for slug, caps in (personas or {}).items():
            if not AGENT_ID_RE.match(slug):
                log.warning("ignoring PromptForge persona with an invalid id: %r", slug)
                continue
            entry = entries.setdefault(
                slug,
                # Without Warren, PromptForge listing an agent is what keeps it fresh.
                {"agent_id": slug, "source": "promptforge", "seen": self.warren is None},
            )
            entry["capabilities"] = caps
        return [entries[k] for k in sorted(entries)]
