"""Wrong admin tokens at the sign-in are slowed down per client address and for the process."""

from __future__ import annotations

import httpx

from dispatch.ui import throttle as throttle_module
from dispatch.ui.throttle import SignInThrottle
from tests.serve import ServeProcess
from tests.ui.conftest import ADMIN_TOKEN


def make() -> SignInThrottle:
    return SignInThrottle(client_burst=3, client_per_minute=6, global_burst=5,
                          global_per_minute=60)


def test_a_client_waits_after_its_burst_and_others_do_not() -> None:
    t = make()
    for _ in range(3):
        assert t.retry_after("a", now=100) == 0
        t.failed("a", now=100)
    # Refilled at 6 a minute: one more try in 10 s.
    assert t.retry_after("a", now=100) == 10
    assert t.retry_after("a", now=105) == 5
    assert t.retry_after("b", now=105) == 0
    assert t.retry_after("a", now=110) == 0
    t.failed("a", now=110)
    assert t.retry_after("a", now=110) == 10


def test_many_addresses_share_the_global_bucket() -> None:
    t = make()
    for i in range(5):
        t.failed(f"client-{i}", now=0)
    # Nobody, not even an address never seen, tries before the global bucket refills (1 a s).
    assert t.retry_after("someone-new", now=0) == 1
    assert t.retry_after("someone-new", now=1) == 0


def test_addresses_remembered_stay_bounded() -> None:
    t = SignInThrottle(client_burst=1, client_per_minute=60, global_burst=10**6,
                       global_per_minute=10**6)
    limit = throttle_module.MAX_CLIENTS
    for i in range(limit + 50):
        t.failed(f"c{i}", now=i / 1000)
    assert len(t._clients) <= limit
    # The newest are remembered.
    assert t.retry_after(f"c{limit + 49}", now=(limit + 49) / 1000) > 0


async def test_wrong_tokens_get_429_with_retry_after(server: ServeProcess) -> None:
    async with httpx.AsyncClient(base_url=server.api, timeout=10) as client:
        answers = [(await client.post("/ui/login", data={"token": f"guess-{i}"})).status_code
                   for i in range(200)]
        # The default burst of 10 a client, then nothing but 429s: at most 10 guesses answered.
        assert answers.count(403) == 10 and answers.count(429) == 190, answers
        r = await client.post("/ui/login", data={"token": "guess"})
        assert r.status_code == 429
        assert 1 <= int(r.headers["retry-after"]) <= 10
        assert "try again in" in r.text
        # While throttled even the right token is refused unread: no oracle for guessers.
        r = await client.post("/ui/login", data={"token": ADMIN_TOKEN})
        assert r.status_code == 429
        assert "dispatch_ui" not in client.cookies
    # Another address signs in as usual.
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(base_url=server.api, timeout=10, transport=transport) as other:
        r = await other.post("/ui/login", data={"token": ADMIN_TOKEN})
        assert r.status_code == 303
