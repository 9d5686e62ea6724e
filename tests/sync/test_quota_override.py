"""A device's own quota (`dgdm coordinator devices quota`) over the [ingest] defaults, applied
by a running coordinator within 5 s; a message over quota is never receipted, so the device
sends it again and nothing is lost. Real mosquitto, real SQLite, the real CLI."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Any

from dgdm.sync.coordinator.config import IngestSection
from dgdm.sync.coordinator.service import Coordinator
from dgdm.sync.envelope import Kind

from .conftest import eventually


def _cli(config: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "dgdm.agent",
            "coordinator",
            "devices",
            *args,
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


async def test_a_device_quota_set_by_the_cli_lifts_the_default(
    sync_rig: Any, mqtt_broker: Any, tmp_path: Any
) -> None:
    rig = sync_rig(mqtt_broker)
    device = rig.device("busy", receipt_timeout_s=1.0)
    config = dataclasses.replace(
        rig.config(), ingest=IngestSection(telemetry_per_s=0.01, burst_s=1.0)
    )  # a bucket of 100 telemetry messages, refilled once in 100 s
    coordinator = Coordinator(config)
    await coordinator.start()
    rig.coordinator = coordinator
    await coordinator.add_device(device.device_id, device.public_b64)
    await coordinator.wait_connected(10)
    await device.start()
    for i in range(150):
        device.enqueue(Kind.TELEMETRY, {"samples": [{"i": i}]})

    def refused() -> float:
        return coordinator.metrics.value("dgdm_coordinator_rejects_total", reason="rate_limited")

    await eventually(lambda: refused() >= 50, what="the default quota refuses the excess")
    assert device.queued() >= 50  # refused messages are not receipted: still in the outbox

    toml = tmp_path / "coordinator.toml"
    toml.write_text(
        f'[coordinator]\ndata_dir = "{config.coordinator.data_dir}"\n'
        f'private_key = "{config.coordinator.private_key}"\n',
        encoding="utf-8",
    )
    bad = _cli(toml, "quota", device.device_id, "--telemetry-per-s", "-3")
    assert bad.returncode == 2
    assert "telemetry-per-s" in bad.stderr
    assert _cli(toml, "quota", "nobody", "--telemetry-per-s", "5").returncode == 2
    done = _cli(toml, "quota", device.device_id, "--telemetry-per-s", "1000")
    assert done.returncode == 0, done.stderr

    await eventually(lambda: device.queued() == 0, timeout=30, what="all stored once lifted")
    rows = await coordinator.latest(device.device_id, Kind.TELEMETRY, 500)
    assert sorted(r["body"]["samples"][0]["i"] for r in rows) == list(range(150))
    assert _cli(toml, "quota", device.device_id, "--clear").returncode == 0
