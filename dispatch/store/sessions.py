"""Dashboard sign-ins, dispatch.ui_sessions: one row per live session, keyed by the SHA-256 of the
session id its cookie carries."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from dispatch.store.base import Conn, Queries


class UiSessions(Queries):
    async def start(
        self, session_hash: bytes, key_id: str, seconds: int, *, now: datetime | None = None,
        conn: Conn | None = None,
    ) -> datetime:
        rows = await self._rows(
            "SELECT dispatch.ui_session_start(%s, %s, %s, coalesce(%s::timestamptz, now())) AS e",
            (session_hash, key_id, seconds, now), conn,
        )
        expires: datetime = rows[0]["e"]
        return expires

    async def end(self, session_hash: bytes, *, conn: Conn | None = None) -> bool:
        rows = await self._rows("SELECT dispatch.ui_session_end(%s) AS ended", (session_hash,),
                                conn)
        return bool(rows[0]["ended"])

    async def live(
        self, session_hashes: Collection[bytes], key_id: str, *, now: datetime | None = None,
        conn: Conn | None = None,
    ) -> set[bytes]:
        """The given sessions that are live under key_id."""
        if not session_hashes:
            return set()
        rows = await self._rows(
            "SELECT h FROM dispatch.ui_sessions_live(%s, %s, coalesce(%s::timestamptz, now())) h",
            (list(session_hashes), key_id, now), conn,
        )
        return {bytes(r["h"]) for r in rows}

    async def retire(self, key_id: str, *, conn: Conn | None = None) -> int:
        """End the sessions signed with any other admin token; how many ended."""
        rows = await self._rows("SELECT dispatch.ui_sessions_retire(%s) AS n", (key_id,), conn)
        return int(rows[0]["n"])
