"""A real `dispatch serve` in auth.mode tokens (DISPATCH_AUTH_MODE=tokens): the admin issues
tokens over REST, agents and requesters use the client with theirs, a stranger sees nothing of
their tasks, and a revoked agent is shut out."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from dispatch.errors import Forbidden, NotFound, Unauthorized
from dispatch.sdk.client import AsyncDispatchClient
from tests.serve import serving

ENV = {"DISPATCH_AUTH_MODE": "tokens"}


async def test_tokens_mode_end_to_end(db_url: str, tmp_path: Path) -> None:
    with serving(db_url, tmp_path, env=ENV) as sp:
        admin = {"X-Agent-ID": "ops", "Authorization": f"Bearer {sp.admin_token}"}
        tokens = {}
        for who in ("alice", "worker-a", "mallory"):
            r = httpx.post(f"{sp.api}/api/v1/agents/{who}/tokens", headers=admin)
            assert r.status_code == 201, r.text
            tokens[who] = r.json()["token"]

        async with AsyncDispatchClient(sp.api, "alice", token=tokens["alice"]) as alice, \
                AsyncDispatchClient(sp.api, "worker-a", token=tokens["worker-a"]) as worker, \
                AsyncDispatchClient(sp.api, "mallory", token=tokens["mallory"]) as mallory, \
                AsyncDispatchClient(sp.api, "worker-a") as tokenless:
            with pytest.raises(Unauthorized):
                await tokenless.register(capabilities=["review"])
            await worker.register(capabilities=["review"])
            created = await alice.create("secret work", required_capabilities=["review"])
            with pytest.raises(NotFound):
                await mallory.get(created.task_id)
            assert (await mallory.list()).tasks == []
            # The worker claims it, or the assigner pushed it there first.
            task = await worker.claim(wait_seconds=5)
            deadline = asyncio.get_running_loop().time() + 10
            while task is None and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
                got = await worker.get(created.task_id)
                task = got if got.assigned_agent == "worker-a" else None
            assert task is not None and task.task_id == created.task_id
            done = await worker.complete(task.task_id, {"ok": True})
            assert done.status == "completed"
            assert (await alice.get(created.task_id)).result == {"ok": True}

            r = httpx.delete(f"{sp.api}/api/v1/agents/worker-a/tokens", headers=admin)
            assert r.status_code == 204
            with pytest.raises(Forbidden):
                await worker.claim()
