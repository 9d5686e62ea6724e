"""The agent's pure parts: alert policy, telemetry batching, thermal decisions, sd_notify
addresses, config rules, log redaction, and the spool directory through a real process."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dgdm.agent import logs
from dgdm.agent.alerts import INFO, WARNING, Alert, AlertPolicy, Alerts
from dgdm.agent.config import load_config
from dgdm.agent.sdnotify import Notifier
from dgdm.agent.telemetry import TelemetryBatcher, percentile
from dgdm.agent.tpu import TpuMonitor, TpuReading, too_hot
from dgdm.sync.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_alert_announced_once_then_after_repeat_and_recovery_once() -> None:
    clock = Clock()
    policy = AlertPolicy(repeat_s=100, max_per_minute=100, clock=clock)
    assert policy.raise_("disk_low")
    clock.now = 50
    assert not policy.raise_("disk_low")
    clock.now = 101
    assert policy.raise_("disk_low")
    assert policy.clear("disk_low")
    assert not policy.clear("disk_low")
    assert policy.raise_("disk_low")  # a new episode is announced at once


def test_alert_rate_limit_holds_back_but_does_not_forget() -> None:
    clock = Clock()
    policy = AlertPolicy(repeat_s=1000, max_per_minute=2, clock=clock)
    assert [policy.raise_(c) for c in ("a", "b", "c")] == [True, True, False]
    assert policy.suppressed == 1
    clock.now = 61
    assert policy.raise_("c")  # still active: announced once the window has room


def test_alerts_sink_gets_bodies() -> None:
    sent: list[Alert] = []
    alerts = Alerts(AlertPolicy(60, 10), sent.append)
    alerts.condition(Alert("tpu_overheat", WARNING, "hot", {"temp_c": 90}))
    alerts.condition(Alert("tpu_overheat", WARNING, "hot", {"temp_c": 91}))
    alerts.resolved("tpu_overheat", Alert("tpu_cooled", INFO, "cool"))
    assert [a.code for a in sent] == ["tpu_overheat", "tpu_cooled"]
    assert set(sent[0].body()) == {"code", "severity", "message", "details"}


@given(st.lists(st.floats(0, 1e6), min_size=1, max_size=200), st.floats(0.1, 100))
def test_percentile_is_an_element_bounded_by_min_max(values: list[float], q: float) -> None:
    p = percentile(values, q)
    assert p in values
    assert min(values) <= p <= max(values)
    assert sum(v <= p for v in values) >= q / 100 * len(values) - 1e-9


def test_telemetry_batches_by_time() -> None:
    clock = Clock()
    batcher = TelemetryBatcher(60, clock)
    for t in (10, 20, 30, 40, 50):
        clock.now = t
        assert batcher.add({"ts": t}) is None
    clock.now = 60
    body = batcher.add({"ts": 60})
    assert body == {"samples": [{"ts": t} for t in (10, 20, 30, 40, 50, 60)]}
    assert batcher.flush() is None


@pytest.mark.parametrize(
    ("temp", "protecting", "expected"),
    [
        (None, False, False),
        (None, True, True),
        (86, False, True),
        (85, False, False),
        (82, True, True),
        (79.9, True, False),
    ],
)
def test_thermal_hysteresis(temp: float | None, protecting: bool, expected: bool) -> None:
    assert too_hot(temp, 85.0, 5.0, protecting) is expected


async def test_tpu_monitor_moves_work_off_a_hot_tpu_and_back() -> None:
    excluded: list[set[str]] = []
    sent: list[Alert] = []
    readings = iter(
        [TpuReading(True, ("/dev/apex_0",), temp_c=t) for t in (70, 90, 84, 70)]
        + [TpuReading(False, reason="unplugged")]
    )
    monitor = TpuMonitor(Alerts(AlertPolicy(3600, 100), sent.append), excluded.append, 85, 5,
                         read=lambda: next(readings))  # fmt: skip
    for _ in range(5):
        await monitor.poll()
    assert excluded == [{"edgetpu"}, set()]
    assert [a.code for a in sent] == ["tpu_overheat", "tpu_cooled", "tpu_lost"]


def test_sd_notify_addresses_and_watchdog(tmp_path: Path) -> None:
    assert not Notifier({}).enabled
    assert Notifier({"NOTIFY_SOCKET": "@x"})._address == b"\0x"
    env = {"NOTIFY_SOCKET": str(tmp_path / "s"), "WATCHDOG_USEC": "3000000"}
    assert Notifier(env).watchdog_interval_s == 1.5
    assert Notifier({**env, "WATCHDOG_PID": "1"}).watchdog_interval_s is None
    absent = Notifier({"NOTIFY_SOCKET": str(tmp_path / "absent")})
    assert not absent.ready("x")
    absent.close()


def test_config_env_overrides_and_cross_checks(tmp_path: Path) -> None:
    env = {"DGDM__HTTP__PORT": "9000", "DGDM__SYNC__ENCRYPT_TELEMETRY": "false"}
    config = load_config(None, env=env)
    assert config.http.port == 9000
    assert config.sync.encrypt_telemetry is False
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"DGDM__TELEMETRY__BATCH_S": "1", "DGDM__TELEMETRY__INTERVAL_S": "5"})
    assert err.value.key == "telemetry.batch_s"
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"DGDM__HTTP__BIND": "::", "DGDM__HTTP__TOKEN": ""})
    assert err.value.key == "http.token"
    assert load_config(None, env={"DGDM__HTTP__BIND": "::1"}).http.bind == "::1"


def test_logs_are_json_lines_without_secrets() -> None:
    stream = io.StringIO()
    logs.setup("info", stream)
    import logging

    logging.getLogger("dgdm.test").info("hello", extra={"token": "abc", "device_id": "d1"})
    logging.getLogger("dgdm.test").debug("hidden")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 1
    assert lines[0]["msg"] == "hello"
    assert lines[0]["token"] == "***"
    assert lines[0]["device_id"] == "d1"


def test_spool_files_processed_once_into_done_and_failed(
    start_agent: Any, tmp_path: Path, karate: dict[str, Any]
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "good.json").write_text(json.dumps(karate), encoding="utf-8")
    (spool / "bad.json").write_text('{"nodes": 3}', encoding="utf-8")
    old = time.time() - 5
    for name in ("good.json", "bad.json"):
        os.utime(spool / name, (old, old))
    start_agent({"spool": {"dir": str(spool), "poll_s": 0.1}})
    deadline = time.monotonic() + 15
    while not (
        (spool / "done" / "good.json").exists() and (spool / "failed" / "bad.json").exists()
    ):
        assert time.monotonic() < deadline, sorted(p.name for p in spool.rglob("*"))
        time.sleep(0.1)
    result = json.loads((spool / "done" / "good.result.json").read_text(encoding="utf-8"))
    assert len(result["embedding"]) == 34
    assert "nodes" in (spool / "failed" / "bad.error.txt").read_text(encoding="utf-8")
    assert not list(spool.glob("*.json"))


@given(
    rows=st.integers(0, 6),
    cols=st.integers(0, 5),
    scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e6, 1e30]),
    seed=st.integers(0, 2**16),
)
def test_stdlib_json_round_trips_a_float32_embedding_exactly(
    rows: int, cols: int, scale: float, seed: int
) -> None:
    """Without orjson the embedding is written with 9 significant digits: still exact."""
    import numpy as np

    from dgdm.agent import jsonio as runtime

    z = (np.random.default_rng(seed).normal(size=(rows, cols)) * scale).astype(np.float32)
    answer = {"job_id": "j", "embedding": z, "outbox_seq": 4}
    saved, runtime._orjson = runtime._orjson, None
    try:
        back = runtime.loads(runtime.dumps(answer))
        chunked = runtime.loads(runtime.dumps_answer_chunked(answer, values_per_chunk=7))
    finally:
        runtime._orjson = saved
    for decoded in (back, chunked):
        assert set(decoded) == {"job_id", "embedding", "outbox_seq"}
        got = np.array(decoded["embedding"], dtype=np.float32).reshape(rows, cols)
        np.testing.assert_array_equal(got, z)


def test_stdlib_json_refuses_nan_and_bad_bytes() -> None:
    from dgdm.agent import jsonio as runtime

    saved, runtime._orjson = runtime._orjson, None
    try:
        for bad in (b'{"a": NaN}', b"\xff\xfe\x00", b'{"a":'):
            with pytest.raises(runtime.BadJson):
                runtime.loads(bad)
        assert runtime.loads('{"a": [1, 2.5]}'.encode("utf-16")) == {"a": [1, 2.5]}
    finally:
        runtime._orjson = saved
