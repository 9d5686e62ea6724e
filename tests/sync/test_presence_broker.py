"""A coordinator's presence through real mosquitto: online at connect, lost by its will,
offline at a clean stop; and a device that sees a coordinator come back resends."""

from __future__ import annotations

import dataclasses
import json
import socket

from dgdm.sync import presence
from dgdm.sync.broker import Broker
from dgdm.sync.coordinator.service import Coordinator
from dgdm.sync.envelope import Kind
from dgdm.sync.mqtt import MqttClient

from .conftest import eventually, mqtt_options


async def test_online_lost_and_offline_are_published(mqtt_broker: Broker, sync_rig) -> None:
    rig = sync_rig(mqtt_broker)
    seen: list[dict] = []
    watcher = MqttClient(
        mqtt_options(mqtt_broker, f"watch-{rig.tag}"),
        on_message=lambda _t, p: seen.append(json.loads(p)) if p else None,
        on_retained=lambda _t, p: seen.append(json.loads(p)) if p else None,
        subscriptions=((presence.topic(rig.tag), 1),),
    )
    await watcher.start()
    await watcher.wait_connected(5)
    try:
        coordinator = await rig.start_coordinator()
        await eventually(lambda: [s["state"] for s in seen] == ["online"])
        assert seen[0]["incarnation"] == coordinator.presence.incarnation
        # The connection dies without a DISCONNECT: the broker publishes the will.
        assert coordinator.mqtt is not None
        assert coordinator.mqtt._conn is not None
        coordinator.mqtt._conn.client.socket().shutdown(socket.SHUT_RDWR)
        await eventually(lambda: "lost" in [s["state"] for s in seen])
        await coordinator.wait_connected(10)  # it reconnects and says online again
        await eventually(lambda: [s["state"] for s in seen][-1] == "online")
        await rig.stop_coordinator()
        await eventually(lambda: [s["state"] for s in seen][-1] == "offline")
        assert {s["incarnation"] for s in seen} == {coordinator.presence.incarnation}
    finally:
        await (await watcher.publish(presence.topic(rig.tag), b"", retain=True))
        await watcher.stop()


async def test_a_device_resends_when_the_only_coordinator_comes_back(
    mqtt_broker: Broker, sync_rig
) -> None:
    """A coordinator restarted with its persistent session gone (session_expiry_s = 0) lost
    what the broker took for it meanwhile; the device resends on its presence, not after
    receipt_timeout_s."""
    rig = sync_rig(mqtt_broker)
    device = rig.device("d")  # receipt_timeout_s: the default 60 s
    config = rig.config()
    config = dataclasses.replace(config, mqtt=dataclasses.replace(config.mqtt, session_expiry_s=0))

    async def start_coordinator() -> Coordinator:
        coordinator = Coordinator(config)
        await coordinator.start(http=False)
        await coordinator.add_device(device.device_id, device.public_b64)
        await coordinator.wait_connected(10)
        return coordinator

    coordinator = await start_coordinator()
    await device.start()
    await eventually(lambda: len(device.link.presence.online) == 1)
    await coordinator.stop()
    await eventually(lambda: len(device.link.presence.online) == 0)
    # With nobody subscribed, the broker PUBACKs these and drops them.
    seqs = [device.enqueue(Kind.RESULT, {"i": i}) for i in range(20)]
    await eventually(lambda: device.link.mqtt.acked >= 20)
    rig.coordinator = coordinator = await start_coordinator()
    await eventually(lambda: device.queued() == 0, timeout=10, what="resent and receipted")
    stored = coordinator.store.results_since(device.device_id, 0, 100)
    assert sorted(r["seq"] for r in stored) == seqs
    assert device.link.counters["presence_resends"] == 20
