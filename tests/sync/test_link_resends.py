"""Resends through real mosquitto: fast where a message was lost, none where nothing was.

- A broker whose queue for the coordinator overflows PUBACKs a device's result and drops
  it; the receipts for later results show the gap, and the device resends it in seconds
  (issue 19 item 5), not after `receipt_timeout_s`.
- A slow coordinator, and two replicas of different speed splitting one device's messages
  (MQTT 5 shared subscription), cause no resend storm: resends stay <= 1 % of messages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

from dgdm.sync.broker import Broker
from dgdm.sync.coordinator.service import Coordinator
from dgdm.sync.envelope import Kind

from .conftest import eventually


async def test_a_result_the_broker_dropped_after_its_puback_is_resent_in_seconds(
    tmp_path: Path, sync_rig
) -> None:
    # mosquitto holds at most 5 in flight + 5 queued for a client that does not read.
    broker = Broker(tmp_path / "b", max_inflight_messages=5, max_queued_messages=5).start()
    try:
        rig = sync_rig(broker)
        device = rig.device("d")  # the default receipt_timeout_s: 60 s
        coordinator = await rig.start_coordinator()
        await device.start()
        assert coordinator.mqtt is not None
        coordinator.mqtt.pause_reading()  # a coordinator that cannot keep up
        first = [device.enqueue(Kind.RESULT, {"i": i}) for i in range(100)]
        await eventually(lambda: device.link.mqtt.acked >= 100, what="100 PUBACKs")
        await asyncio.sleep(0.3)
        coordinator.mqtt.resume_reading()
        later = [device.enqueue(Kind.RESULT, {"i": i}) for i in range(100, 110)]
        start = time.monotonic()
        await eventually(lambda: device.queued() == 0, timeout=20, what="all receipted")
        took = time.monotonic() - start
        stored = coordinator.store.results_since(device.device_id, 0, 1000)
        assert sorted(r["seq"] for r in stored) == first + later
        assert device.link.counters["gap_resends"] > 0  # the broker did drop some
        assert device.link.counters["receipt_timeouts"] == 0
        assert took < 10, f"{took:.1f} s"
    finally:
        broker.stop()


async def test_no_resend_storm_with_a_slow_coordinator(mqtt_broker: Broker, sync_rig) -> None:
    rig = sync_rig(mqtt_broker)
    device = rig.device("d")
    # Receipts 3 s after arrival: slow, but within receipt_timeout_s.
    coordinator = await rig.start_coordinator(receipt_interval_ms=3000, receipt_batch=100_000)
    await device.start()
    seqs = []
    for i in range(1000):
        seqs.append(device.enqueue(Kind.RESULT, {"i": i}))
        if i % 50 == 0:
            await asyncio.sleep(0.1)
    await eventually(lambda: device.queued() == 0, timeout=30)
    resent = device.link.state.resent_total
    dups = coordinator.metrics.value("dgdm_duplicates_total")
    print(f"SLOW COORDINATOR: resent {resent} duplicates {dups:.0f} of {len(seqs)}")
    assert resent <= len(seqs) // 100
    assert coordinator.store.count() == len(seqs)


async def test_no_resend_storm_with_two_replicas_of_different_speed(
    mqtt_broker: Broker, sync_rig
) -> None:
    rig = sync_rig(mqtt_broker)
    device = rig.device("d")
    fast = await rig.start_coordinator()
    config = rig.config(receipt_interval_ms=1500)
    section = dataclasses.replace(config.coordinator, id="r2", data_dir=rig.root / "r2")
    mqtt = dataclasses.replace(config.mqtt, client_id=f"{config.mqtt.client_id}-2")
    slow = Coordinator(dataclasses.replace(config, coordinator=section, mqtt=mqtt))
    await slow.start(http=False)
    await slow.add_device(device.device_id, device.public_b64)
    await slow.wait_connected(10)
    try:
        await device.start()
        await asyncio.sleep(0.5)
        seqs = []
        for i in range(1000):
            seqs.append(device.enqueue(Kind.RESULT, {"i": i}))
            if i % 50 == 0:
                await asyncio.sleep(0.1)
        await eventually(lambda: device.queued() == 0, timeout=30)
        resent = device.link.state.resent_total
        stored = fast.metrics.value("dgdm_messages_in_total", kind="result")
        print(f"TWO REPLICAS: resent {resent} of {len(seqs)}; the fast one stored {stored:.0f}")
        assert 0 < stored < len(seqs)  # the shared subscription did split the device's results
        assert resent <= len(seqs) // 100
    finally:
        await slow.stop()
