"""The monitors' decisions, free of I/O: readings and time in, the alert to report out.

Each watcher returns the alert that holds now: a condition (`broker_unreachable`), or the
recovery that clears it (`broker_reachable`, with `clears` naming the condition), or None
when neither is to be reported this round. Repeats are the alert policy's business
(agent/alerts.py): a watcher reports what holds every round, the policy announces it once
per `alerts.repeat_s`, and a recovery only after its condition was announced. Thresholds
are fields, set from the settings at start-up and at every reload (`Watchers.configure`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dgdm.agent.alerts import INFO, WARNING, Alert

if TYPE_CHECKING:
    from dgdm.agent.config import AgentConfig
    from dgdm.sync.envelope import Kind


class BrokerWatch:
    """`broker_unreachable` once the link has been down longer than `offline_alert_s`."""

    def __init__(self, offline_alert_s: float, offline_since: float | None) -> None:
        self.offline_alert_s = offline_alert_s
        # Down from start-up until the first connection: an agent that never reaches its
        # broker is reported like one that lost it.
        self.offline_since = offline_since

    def observe(self, connected: bool, now: float) -> Alert | None:
        if connected:
            self.offline_since = None
            return Alert(
                "broker_reachable", INFO, "Broker reachable again.", clears="broker_unreachable"
            )
        if self.offline_since is None:
            self.offline_since = now
        offline_s = now - self.offline_since
        if offline_s <= self.offline_alert_s:
            return None
        message = f"Broker unreachable for {int(offline_s)} s."
        return Alert("broker_unreachable", WARNING, message, {"offline_s": round(offline_s, 1)})


class ClockWatch:
    """`clock_skew` while the wall clock is more than `max_skew_ms` off the coordinator's
    as estimated from receipts (SPEC §6.1), `clock_ok` once back within half of it."""

    def __init__(self, max_skew_ms: int) -> None:
        self.max_skew_ms = max_skew_ms
        self.skewed = False

    def observe(self, skew_ms: int | None, rtt_ms: float | None) -> Alert | None:
        from dgdm.sync.clock import skew_alarm

        if skew_ms is None:
            return None  # no estimate: nothing to say either way
        limit = self.max_skew_ms
        self.skewed = skew_alarm(self.skewed, skew_ms, limit)
        rtt = None if rtt_ms is None else round(rtt_ms, 1)
        details = {"skew_ms": skew_ms, "max_skew_ms": limit, "rtt_ms": rtt}
        if self.skewed:
            ahead = "behind" if skew_ms > 0 else "ahead of"
            message = f"Clock {abs(skew_ms)} ms {ahead} the coordinator's."
            return Alert("clock_skew", WARNING, message, details)
        message = "Clock agrees with the coordinator's again."
        return Alert("clock_ok", INFO, message, details, clears="clock_skew")


@dataclass
class DiskWatch:
    """`disk_low` while the data directory's file system has less than `min_free_bytes`."""

    min_free_bytes: int
    path: Path

    def observe(self, free_bytes: int) -> Alert:
        details = {
            "free_bytes": free_bytes,
            "min_free_bytes": self.min_free_bytes,
            "path": str(self.path),
        }
        if free_bytes < self.min_free_bytes:
            return Alert("disk_low", WARNING, f"Disk low: {free_bytes} bytes free.", details)
        return Alert("disk_ok", INFO, "Disk space is back.", details, clears="disk_low")


class Watchers:
    """The watchers the monitors own, with their thresholds from the live settings."""

    def __init__(self, config: AgentConfig, now: float) -> None:
        self.broker = BrokerWatch(config.sync.offline_alert_s, offline_since=now)
        self.clock = ClockWatch(config.sync.max_clock_skew_ms)
        self.disk = DiskWatch(config.alerts.disk_min_free_bytes, config.device.data_dir)

    def configure(self, config: AgentConfig) -> None:
        """The reloadable thresholds (config.RELOADABLE), from the next round on."""
        self.broker.offline_alert_s = config.sync.offline_alert_s
        self.clock.max_skew_ms = config.sync.max_clock_skew_ms
        self.disk.min_free_bytes = config.alerts.disk_min_free_bytes


def backend_alert(statuses: list[dict[str, Any]]) -> Alert:
    """`backend_failed` while any backend's last run failed (the engine fell back); its
    recovery once each of them has answered again."""
    failing = failing_backends(statuses)
    if not failing:
        message = "Every failed backend answers again."
        return Alert("backend_recovered", INFO, message, clears="backend_failed")
    names = sorted(failing)
    message = f"Backend {', '.join(names)} failed at run time: diffusions fall back."
    return Alert("backend_failed", WARNING, message, {"backends": names, "reasons": failing})


def failing_backends(statuses: list[dict[str, Any]]) -> dict[str, str]:
    """Backend name -> its last error, for each whose last run failed."""
    return {b["name"]: b.get("last_error", "") for b in statuses if b.get("failing")}


def eviction_alert(kind: Kind, count: int) -> Alert:
    """The outbox dropped `count` messages of `kind` to stay within its size: older ones
    evicted, or a new one refused when only more urgent messages were left to evict."""
    name = kind.name.lower()
    return Alert(
        "outbox_evicting",
        WARNING,
        f"Outbox full: dropped {count} {name} message(s) to stay within max_outbox_bytes.",
        {"kind": name, "count": count},
    )
