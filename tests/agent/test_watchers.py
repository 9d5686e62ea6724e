"""The monitors' decisions as tables: each row is one round's readings and the alert the
watcher reports for it (agent/watchers.py), then the health checks (agent/status.py) on
fakes of the parts they read."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dgdm.agent import status
from dgdm.agent.alerts import INFO, WARNING, Alert, AlertPolicy, Alerts
from dgdm.agent.config import load_config
from dgdm.agent.watchers import (
    BrokerWatch,
    ClockWatch,
    DiskWatch,
    Watchers,
    backend_alert,
    eviction_alert,
)
from dgdm.sync.envelope import Kind
from dgdm.sync.errors import OutboxError

REACHABLE = Alert("broker_reachable", INFO, "Broker reachable again.", clears="broker_unreachable")


def unreachable(offline_s: float) -> Alert:
    message = f"Broker unreachable for {int(offline_s)} s."
    return Alert("broker_unreachable", WARNING, message, {"offline_s": offline_s})


# Down since start-up (t = 0), offline_alert_s = 30: (connected, now) -> reported.
BROKER_ROUNDS = [
    (False, 10.0, None),
    (False, 30.0, None),  # exactly the limit: not yet
    (False, 31.26, unreachable(31.3)),
    (False, 95.0, unreachable(95.0)),  # every round while it lasts; the policy dedupes
    (True, 96.0, REACHABLE),
    (True, 97.0, REACHABLE),  # the policy announces a recovery only once
    (False, 100.0, None),  # a new outage counts from its first round down
    (False, 130.0, None),
    (False, 130.5, unreachable(30.5)),
]


def test_broker_watch_rounds() -> None:
    watch = BrokerWatch(30.0, offline_since=0.0)
    assert [watch.observe(c, now) for c, now, _ in BROKER_ROUNDS] == [
        want for *_, want in BROKER_ROUNDS
    ]


def test_broker_watch_threshold_follows_a_reload() -> None:
    watch = BrokerWatch(30.0, offline_since=0.0)
    assert watch.observe(False, 20.0) is None
    watch.offline_alert_s = 10.0
    assert watch.observe(False, 20.0) == unreachable(20.0)


def skew(ms: int, rtt_ms: float | None) -> Alert:
    ahead = "behind" if ms > 0 else "ahead of"
    details = {"skew_ms": ms, "max_skew_ms": 1000, "rtt_ms": rtt_ms}
    return Alert("clock_skew", WARNING, f"Clock {abs(ms)} ms {ahead} the coordinator's.", details)


def clock_ok(ms: int, rtt_ms: float | None) -> Alert:
    details = {"skew_ms": ms, "max_skew_ms": 1000, "rtt_ms": rtt_ms}
    message = "Clock agrees with the coordinator's again."
    return Alert("clock_ok", INFO, message, details, clears="clock_skew")


# max_skew_ms = 1000, cleared at or below half of it: (skew_ms, rtt_ms) -> reported.
CLOCK_ROUNDS = [
    (None, None, None),  # no estimate yet
    (400, 12.34, clock_ok(400, 12.3)),
    (1000, 12.0, clock_ok(1000, 12.0)),  # at the limit: not skewed
    (1001, 12.0, skew(1001, 12.0)),
    (700, None, skew(700, None)),  # between half and the limit: still skewed
    (None, None, None),  # the estimate went away: no change, nothing said
    (-600, 8.0, skew(-600, 8.0)),
    (-500, 8.0, clock_ok(-500, 8.0)),
    (-1500, 9.96, skew(-1500, 10.0)),
]


def test_clock_watch_rounds() -> None:
    watch = ClockWatch(1000)
    found = [watch.observe(ms, rtt) for ms, rtt, _ in CLOCK_ROUNDS]
    assert found == [want for *_, want in CLOCK_ROUNDS]
    assert watch.skewed


DISK_ROWS = [
    (0, "disk_low", WARNING, "Disk low: 0 bytes free.", None),
    (999, "disk_low", WARNING, "Disk low: 999 bytes free.", None),
    (1000, "disk_ok", INFO, "Disk space is back.", "disk_low"),
    (10**12, "disk_ok", INFO, "Disk space is back.", "disk_low"),
]


@pytest.mark.parametrize(("free", "code", "severity", "message", "clears"), DISK_ROWS)
def test_disk_watch(free: int, code: str, severity: str, message: str, clears: str | None) -> None:
    found = DiskWatch(1000, Path("/var/lib/dgdm")).observe(free)
    details = {"free_bytes": free, "min_free_bytes": 1000, "path": "/var/lib/dgdm"}
    assert found == Alert(code, severity, message, details, clears=clears)


FAILED = {"name": "tflite", "available": True, "failing": True, "last_error": "boom"}
RECOVERED = Alert(
    "backend_recovered", INFO, "Every failed backend answers again.", clears="backend_failed"
)
BACKEND_ROWS = [
    ([], RECOVERED),
    ([{"name": "numpy", "failing": False}], RECOVERED),
    (
        [{"name": "numpy"}, FAILED, {"name": "edgetpu", "failing": True}],
        Alert(
            "backend_failed",
            WARNING,
            "Backend edgetpu, tflite failed at run time: diffusions fall back.",
            {"backends": ["edgetpu", "tflite"], "reasons": {"tflite": "boom", "edgetpu": ""}},
        ),
    ),
]


@pytest.mark.parametrize(("statuses", "want"), BACKEND_ROWS)
def test_backend_alert(statuses: list[dict[str, Any]], want: Alert) -> None:
    assert backend_alert(statuses) == want


def test_eviction_alert() -> None:
    assert eviction_alert(Kind.TELEMETRY, 3) == Alert(
        "outbox_evicting",
        WARNING,
        "Outbox full: dropped 3 telemetry message(s) to stay within max_outbox_bytes.",
        {"kind": "telemetry", "count": 3},
    )


def test_watchers_take_the_reloadable_thresholds() -> None:
    config = load_config(None, env={})
    watchers = Watchers(config, now=5.0)
    assert watchers.broker.offline_since == 5.0  # down from start-up
    assert watchers.disk.path == config.device.data_dir
    sync = dataclasses.replace(config.sync, offline_alert_s=7.0, max_clock_skew_ms=9)
    alerts = dataclasses.replace(config.alerts, disk_min_free_bytes=11)
    watchers.configure(dataclasses.replace(config, sync=sync, alerts=alerts))
    assert watchers.broker.offline_alert_s == 7.0
    assert watchers.clock.max_skew_ms == 9
    assert watchers.disk.min_free_bytes == 11


def test_report_routes_conditions_and_recoveries() -> None:
    sent: list[Alert] = []
    alerts = Alerts(AlertPolicy(repeat_s=100, max_per_minute=100), sent.append)
    disk = DiskWatch(1000, Path("/d"))
    alerts.report(None)
    alerts.report(disk.observe(2000))  # a recovery with nothing announced: silent
    alerts.report(disk.observe(10))
    alerts.report(disk.observe(20))  # within repeat_s
    alerts.report(disk.observe(2000))
    assert [a.code for a in sent] == ["disk_low", "disk_ok"]
    assert "clears" not in sent[1].body()
    assert [a["code"] for a in alerts.recent] == ["disk_low", "disk_ok"]


# -- health -------------------------------------------------------------------------------


class FakeOutbox:
    def __init__(self, full: bool = False, fails: bool = False) -> None:
        self.full, self.fails = full, fails

    def stats(self) -> SimpleNamespace:
        if self.fails:
            raise OutboxError("the store is gone")
        return SimpleNamespace(storage_full=self.full)


def engine(*backends: dict[str, Any]) -> SimpleNamespace:
    return SimpleNamespace(backends_status=lambda: list(backends))


def work(*stuck: float) -> SimpleNamespace:
    return SimpleNamespace(stuck=lambda: list(stuck))


OK_ENGINE = engine({"name": "numpy", "available": True})
TFLITE_GONE = {"name": "tflite", "available": False}
NUMPY_SICK = {"name": "numpy", "available": True, "healthy": False}
NUMPY_WELL = {"name": "numpy", "available": True, "healthy": True}
HEALTH_ROWS = [
    # loop lag, outbox, engine, work -> the failing check (None: healthy)
    (0.0, None, OK_ENGINE, work(), None),
    (4.99, FakeOutbox(), OK_ENGINE, work(), None),
    (5.0, None, OK_ENGINE, work(), "loop"),
    (0.0, FakeOutbox(full=True), OK_ENGINE, work(), "store"),
    (0.0, FakeOutbox(fails=True), OK_ENGINE, work(), "store"),
    (0.0, None, engine(), work(), "backend"),
    (0.0, None, engine(TFLITE_GONE, NUMPY_SICK), work(), "backend"),
    (0.0, None, engine(TFLITE_GONE, NUMPY_WELL), work(), None),
    (0.0, None, OK_ENGINE, work(3.5), "workers"),
]  # fmt: skip


@pytest.mark.parametrize(("lag", "outbox", "engine", "work", "failing"), HEALTH_ROWS)
def test_health(lag: float, outbox: Any, engine: Any, work: Any, failing: str | None) -> None:
    healthy, checks = asyncio.run(status.health(lag, outbox, engine, work))
    assert checks == {name: name != failing for name in ("loop", "store", "backend", "workers")}
    assert healthy == (failing is None)


def test_broker_json() -> None:
    assert status.broker_json(None, configured=False) == {"configured": False, "connected": False}
    assert status.broker_json(None, configured=True) == {"configured": True, "connected": False}
    link = SimpleNamespace(
        connected=True,
        last_sync_ms=1234,
        mqtt=SimpleNamespace(active_wire="lean"),
        clock_skew_ms=lambda: -7,
    )
    assert status.broker_json(link, configured=True) == {
        "configured": True,
        "connected": True,
        "last_sync_ms": 1234,
        "wire": "lean",
        "clock_skew_ms": -7,
    }
