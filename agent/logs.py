"""Logging as one JSON object per line on stdout (journald keeps it; jq reads it).

Every record carries ts, level, logger and msg, plus the `extra={...}` fields of the call.
Fields whose names look like secrets are replaced, so a token or password handed to a log
call by mistake never reaches the journal. Warnings a peer can trigger at will (a rejected
incoming envelope) pass at most once per reason a minute.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Hashable
from typing import Any

from dgdm.sync.repeat_limiter import RepeatLimiter

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


class RepeatFilter(logging.Filter):
    """Lets one record per key (`key(record)`, None: not limited) through a minute; the
    next one carries `suppressed`, how many were held back in between."""

    def __init__(
        self,
        key: Callable[[logging.LogRecord], Hashable | None],
        limiter: RepeatLimiter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._key = key
        self._limiter = limiter or RepeatLimiter()
        self._clock = clock

    def filter(self, record: logging.LogRecord) -> bool:
        key = self._key(record)
        if key is None:
            return True
        held_back = self._limiter.allow(key, self._clock())
        if held_back is None:
            return False
        if held_back:
            record.suppressed = held_back
        return True


# The link logs one warning per rejected incoming envelope ("dropped envelope on TOPIC:
# REASON (detail)"): a hostile or broken peer can send thousands a second. One line per
# reason a minute is enough (dgdm_envelopes_rejected_total counts every one). The reason is
# one of a fixed set of codes (sync.errors.EnvelopeError), so the keys stay few.
_REJECT_LOGGER = "dgdm.sync.link"
_REJECT_TEMPLATE = "dropped envelope on %s: %s (%s)"


def rejected_envelope_key(record: logging.LogRecord) -> Hashable | None:
    if record.name != _REJECT_LOGGER or record.msg != _REJECT_TEMPLATE:
        return None
    args = record.args if isinstance(record.args, tuple) else ()
    return ("rejected", args[1]) if len(args) == 3 else None


def setup(level: str = "info", stream: Any = None) -> None:
    """Route the root logger to stdout as JSON; called once at start-up."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RepeatFilter(rejected_envelope_key))
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
