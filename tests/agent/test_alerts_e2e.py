"""Alerts end to end with real parts: the `dgdm agent` process, a private mosquitto and the
coordinator (in-process), or a real small file system under the agent's data_dir.

- `outbox_evicting`: a 64 KiB outbox filled with results while no coordinator receipts them
  evicts telemetry, then the oldest results, never alerts; the alert is announced once
  however often the outbox evicts, counted, shown in /status, and stored by the coordinator
  once one appears, together with the results that survived.
- `disk_low` / `disk_ok`: data_dir on an 8 MiB tmpfs; a file that leaves less than
  `alerts.disk_min_free_bytes` free raises the alert once, removing it announces recovery.
  A disk so full that the outbox refuses disk_low itself: the alert waits in line and is
  stored, before disk_ok, once space returns.
- The policy rule behind a recovery: one held back by the rate limit goes out later (its
  real-time form needs a minute of waiting, so it is checked on the policy with a clock).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from dgdm.agent.alerts import AlertPolicy
from dgdm.sync.coordinator.config import (
    CoordinatorConfig,
    CoordinatorSection,
    HttpSection,
    MqttSection,
)
from dgdm.sync.coordinator.service import Coordinator
from dgdm.sync.coordinator.store import SqliteStore
from dgdm.sync.crypto import generate_keypair
from dgdm.sync.envelope import Kind

Agent = Any  # conftest.AgentProcess
MIB = 1 << 20
OUTBOX_BYTES = 64 * 1024  # the smallest outbox the config allows
RESULTS = 60  # ~0.9 KiB each: over three times the ~16 KiB of rows a 64 KiB outbox holds


async def eventually(check: Callable[[], Awaitable[Any]], timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out; last value {value!r}"
        await asyncio.sleep(0.1)


async def get_json(agent: Agent, path: str) -> Any:
    answer = await asyncio.to_thread(agent.get, path)
    assert answer.status == 200, answer.body
    return answer.json()


async def alerts_counted(agent: Agent) -> dict[str, float]:
    """dgdm_alerts_total by code, from the agent's /metrics."""
    text = (await asyncio.to_thread(agent.get, "/metrics")).body.decode()
    found = re.findall(r'^dgdm_alerts_total\{code="([^"]+)"\} (\S+)$', text, re.MULTILINE)
    return {code: float(value) for code, value in found}


def status_codes(status: dict[str, Any]) -> list[str]:
    return [alert["code"] for alert in status["alerts"]]


def make_coordinator(
    tmp_path: Path, broker: Any, key: Path, device_id: str, device_pub: str
) -> Coordinator:
    """A coordinator of this test alone (its own share group, a session that ends with it),
    with the device enrolled before it subscribes, so it refuses none of its messages."""
    store = SqliteStore(tmp_path / "coord" / "coordinator.db")
    store.add_device(device_id, device_pub)
    return Coordinator(
        CoordinatorConfig(
            coordinator=CoordinatorSection(data_dir=tmp_path / "coord", private_key=key),
            mqtt=MqttSection(
                broker_url=broker.url,
                mqtt_version=broker.mqtt_version,
                client_id=f"coord-{device_id}"[:64],
                share_group=f"g-{device_id}"[:64],
                session_expiry_s=0,
            ),
            http=HttpSection(port=0),
        ),
        store=store,
    )


# -- outbox_evicting ----------------------------------------------------------------------


async def test_outbox_eviction_alert_once_and_delivered_once_a_coordinator_appears(
    tmp_path: Path,
    mqtt_broker: Any,
    start_agent: Callable[..., Agent],
    karate: dict[str, Any],
    unique_id: str,
) -> None:
    keys = tmp_path / "keys"
    device_key, _, device_pub = generate_keypair(keys, name="device")
    coord_key, _, coord_pub = generate_keypair(keys, name="coordinator")
    agent = await asyncio.to_thread(
        start_agent,
        {
            "device": {"id": unique_id, "private_key": str(device_key)},
            "sync": {
                "broker_url": mqtt_broker.url,
                "mqtt_version": mqtt_broker.mqtt_version,
                "coordinator_public_key": coord_pub,
                "max_outbox_bytes": OUTBOX_BYTES,
                "receipt_timeout_s": 1.0,
            },
            "telemetry": {"interval_s": 0.1, "batch_s": 0.2},
            "alerts": {"disk_min_free_bytes": 0},  # only the outbox may raise an alert here
            "kernels": {"backend": "numpy"},
        },
    )

    async def telemetry_queued() -> bool:
        return (await get_json(agent, "/outbox"))["kinds"]["telemetry"]["messages"] >= 2

    await eventually(telemetry_queued)  # so that there is telemetry to evict first

    jobs = []
    for _ in range(RESULTS):  # one at a time: each full insert evicts on its own
        answer = await asyncio.to_thread(agent.post_json, "/diffuse?queue=1", karate)
        assert answer.status == 200, answer.body
        jobs.append(answer.json()["job_id"])

    outbox = await get_json(agent, "/outbox")
    kinds = outbox["kinds"]
    assert kinds["telemetry"]["dropped"] >= 2, outbox
    assert kinds["result"]["dropped"] >= RESULTS // 2, outbox  # many evictions, not one
    assert kinds["alert"]["dropped"] == 0, outbox
    assert kinds["alert"]["messages"] == 1, outbox
    assert (agent.data_dir / "outbox.db").stat().st_size <= 1.05 * OUTBOX_BYTES  # README bound

    status = await get_json(agent, "/status")
    assert status_codes(status) == ["outbox_evicting"], status["alerts"]
    alert = status["alerts"][0]
    assert alert["severity"] == "warning"
    assert alert["details"]["kind"] == "telemetry", alert  # the least urgent goes first
    assert (await alerts_counted(agent)) == {"outbox_evicting": 1.0}
    metrics = (await asyncio.to_thread(agent.get, "/metrics")).body.decode()
    assert f"dgdm_outbox_dropped_total {float(outbox['dropped'])}" in metrics.splitlines()
    logged = [line for line in agent.logs() if line.get("alert") == "outbox_evicting"]
    assert len(logged) == 1, logged

    coordinator = make_coordinator(tmp_path, mqtt_broker, coord_key, unique_id, device_pub)
    await coordinator.start(http=False)
    try:

        async def results_stored() -> list[str]:
            rows = await coordinator.results_since(unique_id, 0, 1000)
            stored = [row["body"]["job_id"] for row in rows]
            left = (await get_json(agent, "/outbox"))["kinds"]["result"]["messages"]
            return stored if stored and left == 0 else []

        stored = await eventually(results_stored)
        # Eviction takes the oldest results: what arrives is the newest ones, each once
        # (not necessarily in order: the coordinator may subscribe halfway through a resend).
        assert sorted(stored) == sorted(jobs[-len(stored) :]), (stored, jobs)
        assert len(stored) == RESULTS - kinds["result"]["dropped"]

        async def alerts_stored() -> list[dict[str, Any]]:
            return await coordinator.latest(unique_id, Kind.ALERT, 100)

        rows = await eventually(alerts_stored)
        assert [row["body"]["code"] for row in rows] == ["outbox_evicting"], rows
        assert rows[0]["body"]["details"] == alert["details"]
    finally:
        await coordinator.stop()
    assert (await alerts_counted(agent)) == {"outbox_evicting": 1.0}


# -- disk_low -----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path, mount_tmpfs: Callable[[Path, str], Path]) -> Path:
    """An 8 MiB tmpfs; request it before `start_agent` so the agent stops before umount."""
    return mount_tmpfs(tmp_path / "small-disk", "8m")


async def start_agent_on(
    small_disk: Path, start_agent: Callable[..., Agent], keys: Path, min_free_bytes: int
) -> tuple[Agent, Path]:
    """An agent whose data_dir (and outbox, without a broker: alerts are queued on the small
    disk itself) is on `small_disk`, checking the disk every 0.1 s."""
    _, _, coord_pub = generate_keypair(keys, name="coordinator")
    device_key, _, _ = generate_keypair(keys, name="device")
    data_dir = small_disk / "data"
    agent = await asyncio.to_thread(
        start_agent,
        {
            "device": {"data_dir": str(data_dir), "private_key": str(device_key)},
            "sync": {"coordinator_public_key": coord_pub},
            "telemetry": {"interval_s": 0.1, "batch_s": 60.0},
            "alerts": {"disk_min_free_bytes": min_free_bytes},
            "kernels": {"backend": "numpy"},
        },
    )
    return agent, data_dir


def fill(path: Path, size: int) -> None:
    with path.open("wb") as handle:
        handle.write(bytes(size))  # real tmpfs pages, not a sparse hole


async def test_disk_low_alert_once_and_recovery_on_a_small_file_system(
    small_disk: Path, start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    agent, data_dir = await start_agent_on(small_disk, start_agent, tmp_path / "keys", 4 * MIB)
    free_at_start = shutil.disk_usage(data_dir).free
    assert free_at_start - 5 * MIB < 4 * MIB < free_at_start  # the filler will cross it
    await asyncio.sleep(0.5)  # five disk checks with space to spare
    assert await alerts_counted(agent) == {}
    assert status_codes(await get_json(agent, "/status")) == []

    filler = data_dir / "filler"
    await asyncio.to_thread(fill, filler, 5 * MIB)  # ~1.8 MiB left of ~6.8, under 4 MiB

    async def raised() -> dict[str, float]:
        return await alerts_counted(agent)

    assert await eventually(raised) == {"disk_low": 1.0}
    await asyncio.sleep(0.5)  # five more checks while the disk stays low: no repeat
    assert await alerts_counted(agent) == {"disk_low": 1.0}
    status = await get_json(agent, "/status")
    assert status_codes(status) == ["disk_low"]
    details = status["alerts"][0]["details"]
    assert details["free_bytes"] < details["min_free_bytes"] == 4 * MIB
    assert details["path"] == str(data_dir)
    assert (await get_json(agent, "/outbox"))["storage_full"] is False  # low, not full

    filler.unlink()

    async def recovered() -> bool:
        return "disk_ok" in await alerts_counted(agent)

    await eventually(recovered)
    await asyncio.sleep(0.3)
    assert await alerts_counted(agent) == {"disk_low": 1.0, "disk_ok": 1.0}
    status = await get_json(agent, "/status")
    assert status_codes(status) == ["disk_low", "disk_ok"]
    assert status["alerts"][1]["severity"] == "info"
    outbox = await get_json(agent, "/outbox")
    assert outbox["kinds"]["alert"]["messages"] == 2, outbox


def fill_up(path: Path) -> None:
    """Write to `path` until the file system refuses (ENOSPC)."""
    with path.open("ab") as handle:
        try:
            while True:
                handle.write(bytes(64 * 1024))
                handle.flush()
        except OSError:
            pass


async def test_alert_refused_by_a_full_disk_is_stored_once_space_returns(
    small_disk: Path, start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    """A full disk refuses disk_low itself; it waits in line and goes out before disk_ok."""
    agent, data_dir = await start_agent_on(small_disk, start_agent, tmp_path / "keys", 3 * MIB)
    await asyncio.sleep(0.3)
    filler = data_dir / "filler"
    await asyncio.to_thread(fill_up, filler)

    async def refused() -> bool:
        await asyncio.to_thread(fill_up, filler)  # eat what the outbox frees (its ballast)
        return any(r.get("msg", "").startswith("alert not queued") for r in agent.logs())

    await eventually(refused)
    assert status_codes(await get_json(agent, "/status")) == ["disk_low"]
    assert await alerts_counted(agent) == {}  # announced, not yet stored

    filler.unlink()

    async def both_stored() -> dict[str, float]:
        return await alerts_counted(agent) == {"disk_low": 1.0, "disk_ok": 1.0}

    await eventually(both_stored)
    outbox = await get_json(agent, "/outbox")
    assert outbox["kinds"]["alert"]["messages"] == 2, outbox


# -- the recovery rule --------------------------------------------------------------------


def test_recovery_held_back_by_the_rate_limit_goes_out_later() -> None:
    now = [0.0]
    policy = AlertPolicy(repeat_s=3600, max_per_minute=1, clock=lambda: now[0])
    assert policy.raise_("disk_low")
    now[0] = 10.0
    assert not policy.clear("disk_low")  # the minute's one announcement is used up
    now[0] = 61.0
    assert policy.clear("disk_low")  # still owed: announced once the window has room
    assert not policy.clear("disk_low")
