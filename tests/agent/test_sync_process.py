"""The agent process against a real mosquitto: queued results, commands with replies,
telemetry and alerts, all as sealed envelopes a coordinator can open and receipt."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from dgdm.sync.crypto import (
    derive_link_keys,
    generate_keypair,
    load_private_key,
    load_public_key,
    raw_public,
)
from dgdm.sync.envelope import Kind, open_envelope, seal
from dgdm.sync.mqtt import MqttClient, MqttOptions

DEVICE = "edge-sync-1"


class Cloud:
    """The coordinator's side of one device link, enough to check the agent end to end."""

    def __init__(self, broker_url: str, mqtt_version: str, keys: Any, device_id: str) -> None:
        self.keys = keys
        self.device_id = device_id
        self.received: list[Any] = []
        self.arrived = asyncio.Event()
        self._tasks: set[asyncio.Future[None]] = set()
        self.client = MqttClient(
            MqttOptions(broker_url, f"cloud-{device_id}-{time.monotonic_ns()}", mqtt_version),
            on_message=self._on_message,
            subscriptions=((f"dgdm/v1/{device_id}/+", 1),),
        )
        self.command_seq = int(time.time() * 1000)

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic.endswith("/status"):
            self.received.append(("status", json.loads(payload)))
        else:
            env = open_envelope(
                payload, key=self.keys.up, key_id=self.keys.key_id, expected_device=self.device_id
            )
            self.received.append((env.header.kind, env))
            receipt = {"ranges": [[env.header.seq, env.header.seq]]}
            task = asyncio.ensure_future(
                self._send(Kind.RECEIPT, receipt, "receipt", env.header.seq)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self.arrived.set()

    async def _send(self, kind: Kind, body: dict[str, Any], suffix: str, seq: int) -> None:
        data = seal(
            kind, seq, int(time.time() * 1000), self.device_id, body,
            key=self.keys.down, key_id=self.keys.key_id,
        )  # fmt: skip
        await self.client.publish(f"dgdm/v1/{self.device_id}/{suffix}", data)

    async def command(self, cmd: str, args: Any) -> int:
        self.command_seq += 1
        body = {"cmd": cmd, "args": args, "ttl_ms": 60_000}
        await self._send(Kind.COMMAND, body, "cmd", self.command_seq)
        return self.command_seq

    async def wait_for(self, predicate: Any, timeout_s: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            for kind, item in self.received:
                if predicate(kind, item):
                    return item
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"not received; got {[k for k, _ in self.received]}"
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), remaining)


def make_keys(tmp_path: Path) -> tuple[Path, str, Any]:
    dev_key, _, _ = generate_keypair(tmp_path / "keys", name="device")
    coord_key, _, coord_b64 = generate_keypair(tmp_path / "keys", name="coordinator")
    coord_private = load_private_key(coord_key)
    device_public = load_public_key(tmp_path / "keys" / "device.pub")
    keys = derive_link_keys(
        coord_private, device_public, DEVICE, raw_public(device_public), raw_public(coord_private)
    )
    return dev_key, coord_b64, keys


def sync_sections(broker: Any, dev_key: Path, coord_b64: str, **extra: Any) -> dict[str, Any]:
    return {
        "device": {"id": DEVICE, "private_key": str(dev_key)},
        "sync": {
            "broker_url": broker.url,
            "coordinator_public_key": coord_b64,
            "mqtt_version": broker.mqtt_version,
            "receipt_timeout_s": 5.0,
            **extra,
        },
        "telemetry": {"interval_s": 0.2, "batch_s": 0.4},
        "kernels": {"backend": "numpy"},
    }


async def test_results_commands_and_telemetry_over_mosquitto(
    tmp_path: Path, mqtt_broker: Any, start_agent: Any, karate: dict[str, Any]
) -> None:
    dev_key, coord_b64, keys = make_keys(tmp_path)
    cloud = Cloud(mqtt_broker.url, mqtt_broker.mqtt_version, keys, DEVICE)
    await cloud.client.start()
    try:
        agent = await asyncio.to_thread(start_agent, sync_sections(mqtt_broker, dev_key, coord_b64))
        await cloud.wait_for(lambda k, s: k == "status" and s["state"] == "online")

        answer = await asyncio.to_thread(agent.post_json, "/diffuse?queue=1", karate)
        assert answer.status == 200, answer.body
        job = answer.json()["job_id"]
        result = await cloud.wait_for(lambda k, e: k == Kind.RESULT and e.body["job_id"] == job)
        emb = result.body["embedding"]
        z = np.frombuffer(base64.b64decode(emb["b64"]), dtype="<f4").reshape(emb["shape"])
        assert np.allclose(z, answer.json()["embedding"])

        seq = await cloud.command("diffuse", karate)
        reply = await cloud.wait_for(lambda k, e: k == Kind.REPLY and e.body["cmd_seq"] == seq)
        assert reply.body["ok"] is True, reply.body
        job = reply.body["data"]["job_id"]
        await cloud.wait_for(lambda k, e: k == Kind.RESULT and e.body["job_id"] == job)

        bad = await cloud.command("diffuse", {"nodes": "nope"})
        reply = await cloud.wait_for(lambda k, e: k == Kind.REPLY and e.body["cmd_seq"] == bad)
        assert reply.body["ok"] is False
        assert "nodes" in reply.body["error"]

        telemetry = await cloud.wait_for(lambda k, e: k == Kind.TELEMETRY)
        sample = telemetry.body["samples"][0]
        assert {"cpu_percent", "mem_total_bytes", "disk_free_bytes", "tpu", "outbox"} <= set(sample)
        assert sample["mem_total_bytes"] > 0

        deadline = time.monotonic() + 10
        while True:  # receipts empty the outbox (telemetry keeps arriving, so allow a little)
            depth = (await asyncio.to_thread(agent.get, "/outbox")).json()
            if depth["kinds"]["result"]["messages"] == 0:
                break
            assert time.monotonic() < deadline, depth
            await asyncio.sleep(0.1)
        status = (await asyncio.to_thread(agent.get, "/status")).json()
        assert status["broker"]["connected"] is True
        assert status["broker"]["last_sync_ms"] is not None
        metrics = (await asyncio.to_thread(agent.get, "/metrics")).body.decode()
        assert "dgdm_mqtt_connected 1.0" in metrics
        assert 'dgdm_commands_total{cmd="diffuse",ok="true"}' in metrics
    finally:
        await cloud.client.stop()


async def test_broker_unreachable_alert(
    tmp_path: Path, fresh_broker: Any, start_agent: Any
) -> None:
    dev_key, coord_b64, keys = make_keys(tmp_path)
    fresh_broker.stop()
    sections = sync_sections(fresh_broker, dev_key, coord_b64, offline_alert_s=1.0)
    agent = await asyncio.to_thread(start_agent, sections)
    deadline = time.monotonic() + 15
    while True:
        depth = (await asyncio.to_thread(agent.get, "/outbox")).json()
        if depth["kinds"]["alert"]["messages"] >= 1:
            break
        assert time.monotonic() < deadline, agent.log_tail()
        await asyncio.sleep(0.2)
    fresh_broker.start()
    cloud = Cloud(fresh_broker.url, fresh_broker.mqtt_version, keys, DEVICE)
    await cloud.client.start()
    try:
        # The agent may reconnect and queue broker_reachable before this client subscribes:
        # the one queued while offline is resent until receipted, in whichever order.
        alert = await cloud.wait_for(
            lambda k, e: k == Kind.ALERT and e.body.get("code") == "broker_unreachable",
            timeout_s=30,
        )
        assert alert.body["severity"] == "warning"
    finally:
        await cloud.client.stop()
