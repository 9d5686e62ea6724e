"""Hostile envelopes over a real mosquitto into a real coordinator (issue 16 items 1, 3): a
poison message from one device costs no other device's message, and a forged plaintext
telemetry never reaches a receipt, so it cannot make the device delete the real message."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from dgdm.sync.envelope import Kind, open_envelope, receipt_ranges, seal
from dgdm.sync.mqtt import MqttClient

from .conftest import eventually, mqtt_options

TELEMETRY = {"samples": [{"ts_ms": 1, "cpu_percent": 3.5}]}


async def test_poison_and_forgery_fail_alone_on_the_wire(
    sync_rig: Any, mqtt_broker: Any, rig_store: Any
) -> None:
    rig = sync_rig(mqtt_broker, rig_store)
    good, bad = rig.device("good"), rig.device("bad")
    coordinator = await rig.start_coordinator()
    receipts: dict[str, list[tuple[int, int]]] = {good.device_id: [], bad.device_id: []}
    devices = {d.device_id: d for d in (good, bad)}

    def on_message(topic: str, payload: bytes) -> None:
        device_id = topic.split("/")[2]
        keys = devices[device_id].keys
        env = open_envelope(payload, key=keys.down, key_id=keys.key_id, expected_device=device_id)
        receipts[device_id] += receipt_ranges(env.body)

    client = MqttClient(
        mqtt_options(mqtt_broker, f"attacker-{rig.tag}"),
        on_message=on_message,
        subscriptions=tuple((f"dgdm/v1/{d}/receipt", 1) for d in devices),
    )
    await client.start()
    await client.wait_connected(10)

    def sealed(device: Any, kind: Kind, seq: int, body: Any) -> bytes:
        k = device.keys
        return seal(kind, seq, 1_700_000_000_000, device.device_id, body, key=k.up, key_id=k.key_id)

    forged = seal(Kind.TELEMETRY, 5, 1, good.device_id, TELEMETRY, key=None, key_id=bytes(4))
    try:
        await asyncio.sleep(0.3)  # the receipt subscription is in place
        for device, kind, payload in (
            (good, Kind.TELEMETRY, forged),  # takes the seq of good's next, real message
            (bad, Kind.TELEMETRY, sealed(bad, Kind.TELEMETRY, 2**63, TELEMETRY)),
            (good, Kind.RESULT, sealed(good, Kind.RESULT, 6, {"job_id": "j"})),
            (bad, Kind.TELEMETRY, sealed(bad, Kind.TELEMETRY, 7, TELEMETRY)),
        ):
            await client.publish(f"dgdm/v1/{device.device_id}/{kind.name.lower()}", payload)
        await eventually(
            lambda: receipts[good.device_id] and len(receipts[bad.device_id]) >= 1,
            what="receipts for both devices",
        )
        await asyncio.sleep(0.5)  # anything else would have come by now
    finally:
        await client.stop()
    covered = {
        d: {s for a, b in r for s in range(a, min(b, a + 10) + 1)} for d, r in receipts.items()
    }
    assert covered[good.device_id] == {6}  # never the forged 5
    # The poison is quarantined; its seq is left out of the receipt (no outbox can hold it,
    # and the device's SQLite would fail on the whole receipt), seq 7 is receipted.
    assert covered[bad.device_id] == {7}
    store = coordinator.store
    assert [r["seq"] for r in store.results_since(good.device_id, 0, 10)] == [6]
    assert [r["seq"] for r in store.latest(bad.device_id, Kind.TELEMETRY, 10)] == [7]
    assert store.latest(good.device_id, Kind.TELEMETRY, 10) == []
    assert coordinator.metrics.value("dgdm_coordinator_quarantined_total", reason="malformed") == 1
    # The rejects counter's name is the metrics module's; its reason label is the contract.
    rendered = coordinator.metrics.render().decode()
    assert re.search(r'rejects_total\{reason="unencrypted"\} 1\.0', rendered), rendered
