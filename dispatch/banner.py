"""The lines `dispatch serve` prints once it serves: where everything is, the admin token when it
made one up, and how to put `dispatch` on PATH. Plain text on stderr, whatever the log format, so a
newcomer reads it even when the logs are JSON; printed once per serve (by the supervisor when
there are several workers)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dispatch.settings import Settings

# Set by the supervisor in its workers' environment: the supervisor prints the banner, not them.
SUPERVISED_ENV = "_DISPATCH_SUPERVISED"
# A supervised worker serves its ops app on this Unix socket (dispatch.serve_ops).
OPS_SOCKET_ENV = "_DISPATCH_OPS_SOCKET"


def supervised() -> bool:
    return os.environ.get(SUPERVISED_ENV) == "1"


def _base(host: str, port: int) -> str:
    shown = "localhost" if host in ("0.0.0.0", "::", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def banner(settings: Settings, admin_token: str, *, generated: bool, workers: int = 1) -> str:
    s = settings.server
    api = _base(s.host, s.port)
    ops = _base(s.host, s.metrics_port)
    lines = [
        f"Dispatch is serving ({workers} worker{'s' if workers != 1 else ''}).",
        f"  API         {api}/api/v1",
        f"  API docs    {api}/schema/swagger",
    ]
    if settings.ui.enabled:
        lines.append(f"  Dashboard   {api}/ui")
    lines.append(f"  Metrics     {ops}/metrics" + (" (all workers)" if workers > 1 else ""))
    if generated:
        lines += [
            "The admin token was generated for this run (set server.admin_token or",
            "DISPATCH_ADMIN_TOKEN to keep one); for admin commands and the dashboard's sign-in:",
            f"  export DISPATCH_ADMIN_TOKEN={admin_token}",
        ]
    else:
        lines.append("The admin token is the configured one (server.admin_token).")
    bindir = Path(sys.executable).parent
    if (bindir / "dispatch").exists() and str(bindir) not in os.environ.get("PATH", "").split(
        os.pathsep
    ):
        lines += ["The dispatch command is not on your PATH; to use it:",
                  f"  export PATH={bindir}:$PATH"]
    return "\n".join(lines)


def print_banner(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
