"""Alerts: conditions raised and cleared by the monitors, announced once, rate-limited.

`AlertPolicy` is the pure decision (time in, emit or not out): a condition is announced when
it becomes active, again only after `repeat_s` while it lasts, and its recovery once when it
clears; over all codes no more than `max_per_minute` go out. An announcement held back by
the rate limit is not lost: the next check announces it. For a condition that is because it
still holds; for a recovery, because the condition stays on record as announced until its
recovery has gone out.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

CRITICAL, WARNING, INFO = "critical", "warning", "info"


@dataclass(frozen=True)
class Alert:
    code: str
    severity: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    # What the policy tracks it by, when one code can hold for several things at once
    # (latency_anomaly per topology); not part of the body.
    key: str | None = None
    # A recovery names the condition it clears (disk_ok clears disk_low); not in the body.
    clears: str | None = None

    def body(self) -> dict[str, Any]:
        """The SPEC §6 alert body."""
        return {
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "details": self.details,
        }


class AlertPolicy:
    def __init__(
        self,
        repeat_s: float,
        max_per_minute: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.repeat_s = repeat_s
        self.max_per_minute = max_per_minute
        self._clock = clock
        self._announced: dict[str, float] = {}  # active condition -> when last announced
        self._sent: deque[float] = deque()
        self.suppressed = 0

    def raise_(self, code: str) -> bool:
        """The condition `code` holds now: True if it is to be announced."""
        last = self._announced.get(code)
        now = self._clock()
        if last is not None and now - last < self.repeat_s:
            return False
        if not self._allow(now):
            return False
        self._announced[code] = now
        return True

    def clear(self, code: str) -> bool:
        """The condition no longer holds: True if its recovery is to be announced."""
        if code not in self._announced or not self._allow(self._clock()):
            return False
        del self._announced[code]
        return True

    def _allow(self, now: float) -> bool:
        while self._sent and now - self._sent[0] >= 60.0:
            self._sent.popleft()
        if len(self._sent) >= self.max_per_minute:
            self.suppressed += 1
            return False
        self._sent.append(now)
        return True


class Alerts:
    """Feeds conditions through the policy and hands announcements to `sink` (the outbox)."""

    def __init__(self, policy: AlertPolicy, sink: Callable[[Alert], None]) -> None:
        self.policy = policy
        self._sink = sink
        self.recent: deque[dict[str, Any]] = deque(maxlen=50)

    def report(self, alert: Alert | None) -> None:
        """What a watcher found this round: a condition, a recovery, or nothing."""
        if alert is None:
            return
        if alert.clears is None:
            self.condition(alert)
        else:
            self.resolved(alert.clears, alert)

    def condition(self, alert: Alert) -> None:
        if self.policy.raise_(alert.key or alert.code):
            self._emit(alert)

    def resolved(self, code: str, recovery: Alert) -> None:
        if self.policy.clear(code):
            self._emit(recovery)

    def _emit(self, alert: Alert) -> None:
        level = logging.INFO if alert.severity == INFO else logging.WARNING
        log.log(level, alert.message, extra={"alert": alert.code, "details": alert.details})
        self.recent.append({"ts_ms": int(time.time() * 1000), **alert.body()})
        self._sink(alert)
