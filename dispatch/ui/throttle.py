"""Wrong admin tokens at the sign-in, slowed down: token buckets of failures per client address
and for the whole process.

Every wrong token takes one token from its client's bucket and one from the global bucket; both
refill steadily. While either is empty the sign-in answers 429 with Retry-After before it looks
at the token at all, so guessing gets no answer faster than the refill, however many requests
are sent. The global bucket bounds guessing spread over many addresses; its price is that such a
flood also holds the real admin's sign-in back until it refills (an open session is unaffected).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

# Addresses remembered at most; beyond that, those whose buckets refilled are forgotten first,
# then the oldest (the global bucket still holds).
MAX_CLIENTS = 10_000


@dataclass
class _Bucket:
    tokens: float
    at: float


class SignInThrottle:
    def __init__(
        self,
        *,
        client_burst: int,
        client_per_minute: float,
        global_burst: int,
        global_per_minute: float,
    ) -> None:
        self.client_burst = client_burst
        self.client_rate = client_per_minute / 60
        self.global_burst = global_burst
        self.global_rate = global_per_minute / 60
        self._clients: dict[str, _Bucket] = {}
        # Full: its first refill (from the beginning of time) changes nothing.
        self._global = _Bucket(float(global_burst), -math.inf)

    @staticmethod
    def _refill(bucket: _Bucket, burst: int, rate: float, now: float) -> None:
        bucket.tokens = min(float(burst), bucket.tokens + max(0.0, now - bucket.at) * rate)
        bucket.at = now

    @staticmethod
    def _now(now: float | None) -> float:
        return time.monotonic() if now is None else now

    def retry_after(self, client: str, now: float | None = None) -> int:
        """Seconds this client must wait before its next attempt; 0: it may try now."""
        now = self._now(now)
        wait = 0.0
        self._refill(self._global, self.global_burst, self.global_rate, now)
        if self._global.tokens < 1:
            wait = (1 - self._global.tokens) / self.global_rate
        bucket = self._clients.get(client)
        if bucket is not None:
            self._refill(bucket, self.client_burst, self.client_rate, now)
            if bucket.tokens < 1:
                wait = max(wait, (1 - bucket.tokens) / self.client_rate)
        return math.ceil(wait)

    def failed(self, client: str, now: float | None = None) -> None:
        """A wrong token from this client."""
        now = self._now(now)
        self._refill(self._global, self.global_burst, self.global_rate, now)
        self._global.tokens = max(0.0, self._global.tokens - 1)
        bucket = self._clients.get(client)
        if bucket is None:
            if len(self._clients) >= MAX_CLIENTS:
                self._forget(now)
            bucket = self._clients[client] = _Bucket(float(self.client_burst), now)
        self._refill(bucket, self.client_burst, self.client_rate, now)
        bucket.tokens = max(0.0, bucket.tokens - 1)

    def _forget(self, now: float) -> None:
        for client, bucket in list(self._clients.items()):
            self._refill(bucket, self.client_burst, self.client_rate, now)
            if bucket.tokens >= self.client_burst:
                del self._clients[client]
        while len(self._clients) >= MAX_CLIENTS:
            del self._clients[next(iter(self._clients))]
