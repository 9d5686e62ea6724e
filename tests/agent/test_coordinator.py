"""The agent process with the real coordinator (in-process) over a private mosquitto:
telemetry and results stored at the coordinator, a command answered by a stored reply."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from dgdm.sync.coordinator.config import (
    CoordinatorConfig,
    CoordinatorSection,
    HttpSection,
    MqttSection,
)
from dgdm.sync.coordinator.jobs import parse_job
from dgdm.sync.coordinator.service import Coordinator
from dgdm.sync.crypto import generate_keypair
from dgdm.sync.envelope import Kind

DEVICE = "edge-coord-1"


async def _eventually(check: Any, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def test_telemetry_results_and_commands_reach_the_coordinator(
    tmp_path: Path, mqtt_broker: Any, start_agent: Any, karate: dict[str, Any]
) -> None:
    keys = tmp_path / "keys"
    device_key, _, device_pub = generate_keypair(keys, name="device")
    coord_key, _, coord_pub = generate_keypair(keys, name="coordinator")
    coordinator = Coordinator(
        CoordinatorConfig(
            coordinator=CoordinatorSection(data_dir=tmp_path / "coord", private_key=coord_key),
            mqtt=MqttSection(
                broker_url=mqtt_broker.url,
                mqtt_version=mqtt_broker.mqtt_version,
                client_id=f"coord-{time.monotonic_ns()}",
            ),
            http=HttpSection(port=0),
        )
    )
    await coordinator.start(http=False)
    try:
        # enrolled as sending plaintext telemetry, as the agent is configured below
        await coordinator.add_device(DEVICE, device_pub, plaintext_telemetry=True)
        sections = {
            "device": {"id": DEVICE, "private_key": str(device_key)},
            "sync": {
                "broker_url": mqtt_broker.url,
                "mqtt_version": mqtt_broker.mqtt_version,
                "coordinator_public_key": coord_pub,
                "encrypt_telemetry": False,
            },
            "telemetry": {"interval_s": 0.2, "batch_s": 0.6},
        }
        agent = await asyncio.to_thread(start_agent, sections)

        async def telemetry() -> Any:
            return await coordinator.latest(DEVICE, Kind.TELEMETRY, 5)

        stored = await _eventually(telemetry)
        samples = stored[0]["body"]["samples"]
        assert len(samples) >= 2  # batched: several samples per message
        assert samples[0]["mem_total_bytes"] > 0

        answer = await asyncio.to_thread(agent.post_json, "/diffuse?queue=1", karate)
        job = answer.json()["job_id"]

        async def result() -> Any:
            rows = await coordinator.results_since(DEVICE, 0, 100)
            return [r for r in rows if r["body"]["job_id"] == job]

        assert (await _eventually(result))[0]["body"]["backend"] == answer.json()["backend"]

        seq = await coordinator.send_command(DEVICE, "ping", {})

        async def reply() -> Any:
            command = await coordinator.command(DEVICE, seq)
            return command if command and command.get("reply") else None

        done = await _eventually(reply)
        assert done["reply"]["ok"] is True, done
        assert done["reply"]["data"]["pong"] is True

        # A set_config job to the tag the box carries changes its telemetry interval.
        await asyncio.to_thread(coordinator.store.tag, DEVICE, {"site": "berlin"})
        spec = parse_job(
            {
                "target": {"tags": {"site": "berlin"}},
                "command": {"cmd": "set_config", "args": {"telemetry": {"interval_s": 0.3}}},
            }
        )
        created = await coordinator.create_job(spec)

        async def job_done() -> Any:
            job = await coordinator.job(created["id"])
            return job if job["state"] != "running" else None

        job = await _eventually(job_done)
        assert job["state"] == "completed", job
        assert job["counts"]["succeeded"] == 1, job
        status = (await asyncio.to_thread(agent.get, "/status")).json()
        assert status["config"]["telemetry"]["interval_s"] == 0.3

        # Plaintext telemetry is never receipted (only sealed envelopes advance receipts);
        # the agent drops it from its outbox at the broker's PUBACK instead of resending it.
        async def plaintext_left() -> bool:
            outbox = (await asyncio.to_thread(agent.get, "/outbox")).json()
            return outbox["kinds"]["telemetry"]["messages"] == 0

        await _eventually(plaintext_left, timeout_s=10)
    finally:
        await coordinator.stop()
