"""A real `dispatch serve` per test, a signed-in HTTP client, and (for the browser tests) one
headless Chromium per session."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serve import ServeProcess, serving

ADMIN_TOKEN = "ui-admin-token"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def chromium_path() -> str | None:
    """The system's Chromium (Debian's `chromium` package); Playwright's own download is never
    used."""
    configured = os.environ.get("DISPATCH_CHROMIUM")
    if configured:
        return configured
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def require_chromium() -> str:
    """Call at the top of a browser test module: skips it where no Chromium is installed, unless
    DISPATCH_REQUIRE_BROWSER=1 (CI), where that is a failure."""
    path = chromium_path()
    if path is None:
        reason = "Chromium not found: apt install chromium (or set DISPATCH_CHROMIUM)"
        if os.environ.get("DISPATCH_REQUIRE_BROWSER") == "1":
            pytest.fail(f"DISPATCH_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
        pytest.skip(reason, allow_module_level=True)
    return path


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[ServeProcess]:
    """`dispatch serve` on the defaults, with an admin token."""
    with serving(db_url, tmp_path, admin_token=ADMIN_TOKEN) as sp:
        yield sp


@pytest.fixture
async def rest(server: ServeProcess) -> AsyncIterator[httpx.AsyncClient]:
    """The REST API as the admin (X-Agent-ID ops)."""
    async with httpx.AsyncClient(
        base_url=server.api, timeout=10,
        headers={"X-Agent-ID": "ops", "Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as client:
        yield client


async def sign_in(client: httpx.AsyncClient) -> None:
    r = await client.post("/ui/login", data={"token": ADMIN_TOKEN})
    assert r.status_code == 303, r.text
    assert client.cookies.get("dispatch_ui")


@pytest.fixture
async def ui(server: ServeProcess) -> AsyncIterator[httpx.AsyncClient]:
    """A signed-in client of /ui (no redirects followed, so the tests see them)."""
    async with httpx.AsyncClient(base_url=server.api, timeout=10) as client:
        await sign_in(client)
        yield client


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    """$DISPATCH_SCREENSHOT_DIR (`make screenshots` sets docs/screenshots), else a temporary
    directory."""
    configured = os.environ.get("DISPATCH_SCREENSHOT_DIR")
    path = Path(configured) if configured else Path(tempfile.mkdtemp(prefix="dispatch-ui-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    executable = require_chromium()
    async with async_playwright() as playwright:
        instance = await playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        yield instance
        await instance.close()


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    """A page in a fresh browser context (its own cookies and storage)."""
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(30_000)
    tab = await context.new_page()
    yield tab
    await context.close()
