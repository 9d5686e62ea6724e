"""A real agent whose clock is stepped an hour each way (libfaketime, while it runs) against
a real broker and coordinator: command TTLs hold in coordinator time, `clock_skew` is raised
and cleared, stored messages keep both clocks, telemetry's `coord_ts_ms` does not jump."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dgdm.sync.bench_soak import DEVICE_ID, SoakRig

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
HOUR_MS = 3_600_000

pytestmark = pytest.mark.skipif(not LIBFAKETIME.exists(), reason="needs Debian's libfaketime")


def eventually(check: Callable[[], Any], timeout_s: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = check()
        except (OSError, ValueError, KeyError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.2)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[SoakRig, Path]]:
    offset_file = tmp_path / "faketime"
    offset_file.write_text("+0\n")
    env = {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        # Re-read the offset file each second (FAKETIME_NO_CACHE=1 re-reads it at every
        # clock call, which makes the agent's start-up several times slower).
        "FAKETIME_CACHE_DURATION": "1",
        # Python's monotonic clock (asyncio's timers) stays real, as on a box whose wall
        # clock NTP steps.
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    settings = {"telemetry": {"interval_s": 0.2, "batch_s": 0.4}}
    with SoakRig(tmp_path / "rig", agent_settings=settings, agent_env=env) as running:
        yield running, offset_file


def skew_ms(rig: SoakRig) -> int | None:
    return rig.agent_get("/status")["broker"]["clock_skew_ms"]


def alerts(rig: SoakRig) -> list[dict[str, Any]]:
    return rig.api("GET", f"/devices/{DEVICE_ID}")["alerts"]


def command(rig: SoakRig, ttl_ms: int) -> int:
    body = {"cmd": "ping", "args": {}, "ttl_ms": ttl_ms}
    return int(rig.api("POST", f"/devices/{DEVICE_ID}/commands", body)["seq"])


def command_status(rig: SoakRig, seq: int) -> str:
    return str(rig.api("GET", f"/devices/{DEVICE_ID}/commands/{seq}")["status"])


def expired_count(rig: SoakRig) -> float:
    return rig.agent_metric("dgdm_envelopes_rejected_total", 'reason="expired"')


def check_commands(rig: SoakRig) -> None:
    # A live command executes (with the clock an hour ahead it looked expired on arrival).
    seq = command(rig, ttl_ms=20_000)
    eventually(lambda: command_status(rig, seq) == "replied", what="a live command replied")
    # One that waits longer than its ttl is dropped (an hour behind, it lived an hour more).
    assert rig.agent is not None
    before = expired_count(rig)
    rig.agent.send_signal(signal.SIGSTOP)
    try:
        seq = command(rig, ttl_ms=1_000)
        time.sleep(2.5)
    finally:
        rig.agent.send_signal(signal.SIGCONT)
    eventually(lambda: expired_count(rig) > before, what="the late command dropped as expired")
    assert command_status(rig, seq) == "pending"


def newest_telemetry(rig: SoakRig) -> dict[str, Any]:
    return rig.api("GET", f"/devices/{DEVICE_ID}")["telemetry"]


def check_stored_clocks(rig: SoakRig, step_ms: int) -> None:
    """The store keeps the device's created_ms and its own received_ms; samples carry the
    device's ts_ms and coord_ts_ms, the latter on the coordinator's clock."""

    def stepped_row() -> dict[str, Any] | None:
        row = newest_telemetry(rig)
        return row if abs(row["created_ms"] - row["received_ms"] - step_ms) < 5_000 else None

    row = eventually(stepped_row, what="telemetry created on the stepped clock")
    sample = row["body"]["samples"][-1]
    assert abs(sample["ts_ms"] - row["received_ms"] - step_ms) < 5_000
    assert sample["coord_ts_ms"] is not None
    assert abs(sample["coord_ts_ms"] - row["received_ms"]) < 5_000


def test_an_hour_each_way(rig: tuple[SoakRig, Path]) -> None:
    running, offset_file = rig
    eventually(lambda: skew_ms(running) is not None, what="a first estimate from receipts")
    assert abs(skew_ms(running) or 0) < 2_000
    points: list[int] = []
    for step in ("+1h", "-1h"):
        step_ms = HOUR_MS if step == "+1h" else -HOUR_MS
        offset_file.write_text(f"{step}\n")
        # The estimate rests on the monotonic clock: the skew is seen at once, no receipt
        # needed, and the estimate itself does not move.
        eventually(lambda s=step_ms: abs(skew_ms(running) + s) < 2_000, what=f"skew at {step}")
        eventually(
            lambda: any(a["body"]["code"] == "clock_skew" for a in alerts(running)[:1]),
            what=f"clock_skew raised at {step}",
        )
        check_commands(running)
        check_stored_clocks(running, step_ms)
        points.append(newest_telemetry(running)["body"]["samples"][-1]["coord_ts_ms"])
        offset_file.write_text("+0\n")
        eventually(lambda: abs(skew_ms(running) or 0) < 2_000, what=f"skew gone after {step}")
        eventually(
            lambda: any(a["body"]["code"] == "clock_ok" for a in alerts(running)[:1]),
            what=f"clock_ok after {step}",
        )
    # coord_ts_ms moved forward with real time through both steps, never by an hour.
    assert 0 < points[1] - points[0] < 120_000


def test_an_estimate_within_seconds_of_start_even_with_long_batches(tmp_path: Path) -> None:
    # One telemetry batch a minute and nothing else to send: the first samples go alone
    # until their receipts gave the link an estimate, then batching resumes.
    settings = {"telemetry": {"interval_s": 0.5, "batch_s": 60.0}}
    with SoakRig(tmp_path / "rig", agent_settings=settings) as running:
        eventually(lambda: skew_ms(running) is not None, timeout_s=15, what="an early estimate")
        assert abs(skew_ms(running) or 0) < 2_000
