"""Wall-clock time as the wire and the stores carry it: integer milliseconds since the epoch.

Durations and deadlines use `time.monotonic()` instead; this is only for stamps that leave
the process (envelopes, rows, status bodies)."""

from __future__ import annotations

import time


def now_ms() -> int:
    """The wall clock in whole milliseconds (SPEC's `ts_ms`, the stores' `*_ms` columns)."""
    return time.time_ns() // 1_000_000
