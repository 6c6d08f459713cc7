"""Sign-in to the dashboard: a cookie that names a session the database knows.

The cookie holds a random session id and an HMAC of it keyed by a digest of the admin token, never
the token itself; dispatch.ui_sessions holds the id's SHA-256 and its expiry. A request is signed
in when the HMAC matches (a forged cookie costs no query) and the row is live. So sign-out ends the
session on every replica at once (a copied cookie stops working), a session lapses by itself, a
stolen database copy signs nobody in, and a replica started with a new admin token ends the
sessions of the old one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Collection, Mapping
from urllib.parse import urlsplit

from dispatch.store import UiSessions

COOKIE = "dispatch_ui"
# Anything much longer than a session id and a hex digest is not a cookie this server set.
MAX_COOKIE_LENGTH = 128


class Sessions:
    def __init__(self, admin_token: str, lifetime_seconds: int, store: UiSessions) -> None:
        # Keyed by a digest of the token under a purpose label, so the session key is not the
        # token the API compares Bearer headers with.
        self._key = hashlib.sha256(b"dispatch-ui-session\0" + admin_token.encode()).digest()
        # Names the key in the database (which sessions a new admin token ends); it reveals
        # neither the key nor the token.
        self.key_id = hashlib.sha256(b"dispatch-ui-key-id\0" + self._key).hexdigest()[:32]
        self._admin_token = admin_token
        self._store = store
        self.lifetime = lifetime_seconds

    def token_matches(self, token: str) -> bool:
        """The admin token, compared in constant time (an empty configured token never matches)."""
        return bool(self._admin_token) and hmac.compare_digest(
            token.encode(), self._admin_token.encode()
        )

    def _sign(self, session_id: str) -> str:
        return hmac.new(self._key, session_id.encode(), hashlib.sha256).hexdigest()

    def session_hash(self, cookie: str | None) -> bytes | None:
        """The stored name of the cookie's session when its signature holds, else None."""
        if not cookie or len(cookie) > MAX_COOKIE_LENGTH or "." not in cookie:
            return None
        session_id, signature = cookie.split(".", 1)
        if not hmac.compare_digest(signature.encode(), self._sign(session_id).encode()):
            return None
        return hashlib.sha256(session_id.encode()).digest()

    async def start(self) -> str:
        """A new session: its row, and the cookie that names it."""
        session_id = secrets.token_hex(16)
        await self._store.start(
            hashlib.sha256(session_id.encode()).digest(), self.key_id, self.lifetime
        )
        return f"{session_id}.{self._sign(session_id)}"

    async def valid(self, cookie: str | None) -> bool:
        found = self.session_hash(cookie)
        return found is not None and bool(await self._store.live([found], self.key_id))

    async def live(self, session_hashes: Collection[bytes]) -> set[bytes]:
        """Which of these sessions are still live (the hub ends the streams of the others)."""
        return await self._store.live(session_hashes, self.key_id)

    async def end(self, cookie: str | None) -> None:
        found = self.session_hash(cookie)
        if found is not None:
            await self._store.end(found)

    async def retire_other_keys(self) -> int:
        """At start-up: end the sessions signed with any other admin token."""
        return await self._store.retire(self.key_id)


def same_origin(headers: Mapping[str, str], host: str | None) -> bool:
    """Whether a state-changing request comes from the dashboard's own pages. Browsers send
    Sec-Fetch-Site and Origin with every POST; a request without either is not a browser's
    cross-site one (and would carry no SameSite=Strict cookie anyway)."""
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = headers.get("origin")
    if origin is not None:
        if origin == "null":
            return False
        return host is not None and urlsplit(origin).netloc == host
    return True
