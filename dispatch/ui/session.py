"""Sign-in to the dashboard: a cookie that proves its holder presented the admin token.

The cookie holds an expiry and an HMAC of it keyed by a digest of the admin token, never the token
itself: a stolen cookie does not reveal the token, it lapses by itself, and changing the admin
token invalidates every session at once.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

COOKIE = "dispatch_ui"
# Anything much longer than an expiry and a hex digest is not a cookie this server set.
MAX_COOKIE_LENGTH = 128


class Sessions:
    def __init__(self, admin_token: str, lifetime_seconds: int) -> None:
        # Keyed by a digest of the token under a purpose label, so the session key is not the
        # token the API compares Bearer headers with.
        self._key = hashlib.sha256(b"dispatch-ui-session\0" + admin_token.encode()).digest()
        self._admin_token = admin_token
        self.lifetime = lifetime_seconds

    def token_matches(self, token: str) -> bool:
        """The admin token, compared in constant time (an empty configured token never matches)."""
        return bool(self._admin_token) and hmac.compare_digest(
            token.encode(), self._admin_token.encode()
        )

    def _sign(self, expires: int) -> str:
        return hmac.new(self._key, str(expires).encode(), hashlib.sha256).hexdigest()

    def issue(self, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + self.lifetime)
        return f"{expires}.{self._sign(expires)}"

    def valid(self, cookie: str | None, now: float | None = None) -> bool:
        if not cookie or len(cookie) > MAX_COOKIE_LENGTH or "." not in cookie:
            return False
        raw_expires, signature = cookie.split(".", 1)
        if not raw_expires.isdigit():
            return False
        if not hmac.compare_digest(signature.encode(), self._sign(int(raw_expires)).encode()):
            return False
        return int(raw_expires) > (time.time() if now is None else now)


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
