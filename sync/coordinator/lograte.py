"""At most one log line per key (a device) per interval: a hostile device repeating the same
bad message must not flood the log. Pure: the caller passes the time."""

from __future__ import annotations


class LogRate:
    def __init__(self, interval_s: float = 60.0, max_keys: int = 10_000) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}  # lines held back per key since its last line

    def allow(self, key: str, now_s: float) -> bool:
        """True when `key` may log now; else the line is counted in `suppressed`."""
        last = self._last.get(key)
        if last is not None and now_s - last < self.interval_s:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
            return False
        if last is None and len(self._last) >= self.max_keys:
            # Bounded memory under many ids: forget the stalest half, they may log again.
            for stale in sorted(self._last, key=self._last.__getitem__)[: self.max_keys // 2]:
                del self._last[stale]
                self.suppressed.pop(stale, None)
        self._last[key] = now_s
        return True

    def take_suppressed(self, key: str) -> int:
        """How many lines were held back for `key` since it last logged (and reset)."""
        return self.suppressed.pop(key, 0)


# One per process: quarantined messages are logged once per device per minute.
QUARANTINE_LOG = LogRate(60.0)
