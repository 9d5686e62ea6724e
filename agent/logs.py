"""Logging as one JSON object per line on stdout (journald keeps it; jq reads it).

Every record carries ts, level, logger and msg, plus the `extra={...}` fields of the call.
Fields whose names look like secrets are replaced, so a token or password handed to a log
call by mistake never reaches the journal.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_SECRET_WORDS = ("token", "password", "secret", "private", "authorization", "key")
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD and not name.startswith("_"):
                out[name] = redact(name, value)
        if record.exc_info and record.exc_info[0] is not None:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def redact(name: str, value: Any) -> Any:
    lowered = name.lower()
    if any(word in lowered for word in _SECRET_WORDS) and not lowered.endswith("_id"):
        return "***" if value not in (None, "") else value
    return value


def setup(level: str = "info", stream: Any = None) -> None:
    """Route the root logger to stdout as JSON; called once at start-up."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)
    logging.Formatter.converter = time.gmtime


def set_level(level: str) -> None:
    logging.getLogger().setLevel(LEVELS[level])
    # aiohttp's access log is one line per request: far too much at INFO on a busy box.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
