"""Warren, PromptForge and Alexandria as small real HTTP servers on loopback whose answers the test
controls, in the shapes the real services answer. Each is a ThreadingHTTPServer in a thread."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Fake:
    """What the server answers. `down` makes every request a 503; requests are recorded."""

    down: bool = False
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    url: str = ""

    def handle(self, method: str, path: str) -> tuple[int, Any]:
        raise NotImplementedError


@dataclass
class FakeWarren(Fake):
    agents: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {state, policy}
    wakes: list[str] = field(default_factory=list)
    wake_fails: int = 0  # the first N wake calls answer 500
    wake_event: threading.Event = field(default_factory=threading.Event)

    def set(self, name: str, state: str, policy: str = "on-demand") -> None:
        self.agents[name] = {"state": state, "policy": policy}

    def handle(self, method: str, path: str) -> tuple[int, Any]:
        if method == "GET" and path == "/admin/agents":
            return 200, [{"name": n, **a} for n, a in sorted(self.agents.items())]
        parts = path.strip("/").split("/")
        if method == "GET" and len(parts) == 3 and parts[:2] == ["admin", "agents"]:
            a = self.agents.get(parts[2])
            return (200, {"name": parts[2], **a}) if a else (404, {"error": "no such agent"})
        if method == "POST" and len(parts) == 4 and parts[3] == "wake":
            if self.wake_fails > 0:
                self.wake_fails -= 1
                return 500, {"error": "try again"}
            self.wakes.append(parts[2])
            self.wake_event.set()
            return 202, {"name": parts[2], "state": "waking"}
        return 404, {"error": "not found"}


@dataclass
class FakePromptForge(Fake):
    personas: dict[str, list[str]] = field(default_factory=dict)  # slug -> capabilities
    other_prompts: list[str] = field(default_factory=list)  # non-persona slugs

    def handle(self, method: str, path: str) -> tuple[int, Any]:
        if path == "/api/v1/prompts":
            items = [
                {"id": i, "slug": slug, "name": slug.title(), "type": "persona",
                 "latest_version": 2}
                for i, slug in enumerate(sorted(self.personas))
            ] + [{"id": 1000, "slug": s, "name": s, "type": "template"} for s in self.other_prompts]
            return 200, items
        parts = path.strip("/").split("/")
        if len(parts) == 6 and parts[:3] == ["api", "v1", "prompts"] and parts[4] == "versions":
            caps = self.personas.get(parts[3])
            if caps is None:
                return 404, {"error": "no such prompt"}
            return 200, {
                "version": int(parts[5]),
                "content": {"sections": [
                    {"id": "role", "content": "You are a helpful agent."},
                    # Mixed case and spacing on purpose: Dispatch normalises.
                    {"id": "capabilities", "content": " , ".join(c.upper() for c in caps)},
                ]},
            }
        return 404, {"error": "not found"}


@dataclass
class FakeAlexandria(Fake):
    devices: list[dict[str, Any]] = field(default_factory=list)

    def own(self, owner: str, *, name: str | None = None, identifier: str | None = None) -> None:
        self.devices.append({
            "id": len(self.devices) + 1, "name": name, "device_type": "agent",
            "owner_id": owner, "identifier": identifier,
        })

    def handle(self, method: str, path: str) -> tuple[int, Any]:
        if path == "/api/v1/devices":
            return 200, {"data": self.devices}
        return 404, {"error": "not found"}


def _handler(fake: Fake) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method: str) -> None:
            fake.requests.append((method, self.path, dict(self.headers)))
            if fake.down:
                status, body = 503, {"error": "down for maintenance"}
            else:
                status, body = fake.handle(method, self.path.split("?")[0])
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            self._serve("POST")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def running(fake: Fake) -> Iterator[Fake]:
    """Serve `fake` on a free loopback port for the block; fake.url is its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
