"""Logging set-up: level and format (text on a terminal, JSON lines otherwise) from the settings."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

from dispatch.settings import LoggingSettings

# uvicorn's color_message repeats the message with terminal colour codes: never in a JSON line.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "color_message",
}
_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|\x1b")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _ESCAPES.sub("", record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def log_format(settings: LoggingSettings) -> str:
    """The format in effect, json or text: auto is text when stderr is a terminal."""
    if settings.format == "auto":
        return "text" if sys.stderr.isatty() else "json"
    return settings.format


def configure_logging(settings: LoggingSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format(settings) == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    # pgserver narrates every start at info level; its warnings and errors still come through.
    logging.getLogger("pgserver").setLevel(max(logging.WARNING, root.level))
    # httpx notes every request it sends at info: the supervisor's calls to its workers at each
    # health probe and scrape, every call to Warren, PromptForge and Alexandria. A request that
    # fails reaches the log through its caller.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
