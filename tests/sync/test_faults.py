"""Outages, resends and priorities: the outbox empties only through receipts, exactly once."""

from __future__ import annotations

import asyncio

from dgdm.sync.envelope import Kind

from .conftest import eventually

TELEMETRY = {"samples": [{"ts_ms": 1}]}
ALERT = {"code": "c", "severity": "critical", "message": "m", "details": {}}
RESULT = {"job_id": "j"}


async def test_alerts_go_first_after_an_outage(mqtt_broker, sync_rig) -> None:
    rig = sync_rig(mqtt_broker)
    device = rig.device("d", page_size=50)
    coordinator = await rig.start_coordinator()
    for _ in range(300):
        device.enqueue(Kind.TELEMETRY, TELEMETRY)
    for _ in range(100):
        device.enqueue(Kind.RESULT, RESULT)
    alerts = [device.enqueue(Kind.ALERT, ALERT) for _ in range(20)]
    await device.start()  # the outage ends
    await eventually(lambda: device.queued() == 0)
    rows = coordinator.store._rows("SELECT kind, seq FROM messages ORDER BY id", ())
    kinds = [r["kind"] for r in rows]
    assert [r["seq"] for r in rows[:20]] == alerts  # alerts first, FIFO
    assert kinds.index(int(Kind.TELEMETRY)) > max(
        i for i, k in enumerate(kinds) if k == int(Kind.RESULT)
    )


async def test_coordinator_down_then_back_stores_everything_once(mqtt_broker, sync_rig) -> None:
    rig = sync_rig(mqtt_broker)
    device = rig.device("d", receipt_timeout_s=0.5)
    coordinator = await rig.start_coordinator()
    await device.start()
    await rig.stop_coordinator()
    seqs = [device.enqueue(Kind.RESULT, {"i": i}) for i in range(50)]
    # The link looks for late receipts once a second (TICK_S): by now everything was resent.
    await asyncio.sleep(1.6)
    assert device.queued() == 50
    assert device.link.state.resent_total > 0
    coordinator = await rig.start_coordinator()
    await eventually(lambda: device.queued() == 0)
    stored = coordinator.store.results_since(device.device_id, 0, 1000)
    assert sorted(r["seq"] for r in stored) == seqs  # each exactly once
    assert coordinator.metrics.value("dgdm_duplicates_total") >= 0


async def test_silent_receipt_topic_keeps_messages_and_resends(mqtt_broker, sync_rig) -> None:
    rig = sync_rig(mqtt_broker)
    device = rig.device("d", receipt_timeout_s=1.0)
    coordinator = await rig.start_coordinator()
    await device.start()
    device.link.mqtt.subscriptions = ()
    await asyncio.to_thread(
        device.link.mqtt._conn.client.unsubscribe, f"dgdm/v1/{device.device_id}/receipt"
    )
    await asyncio.sleep(0.2)
    seqs = [device.enqueue(Kind.ALERT, ALERT) for _ in range(10)]
    await eventually(lambda: coordinator.store.count() == 10)
    await asyncio.sleep(2.5)
    assert device.queued() == 10  # stored at the coordinator, but never receipted here
    assert device.link.state.resent_total >= 10
    await eventually(lambda: coordinator.metrics.value("dgdm_duplicates_total") >= 10)
    assert coordinator.store.count() == 10
    assert (
        sorted(r["seq"] for r in coordinator.store.latest(device.device_id, Kind.ALERT, 99)) == seqs
    )


async def test_broker_sigkill_and_restart(fresh_broker, sync_rig) -> None:
    rig = sync_rig(fresh_broker)
    device = rig.device("d", receipt_timeout_s=2.0)
    coordinator = await rig.start_coordinator()
    await device.start()
    first = [device.enqueue(Kind.RESULT, {"i": i}) for i in range(50)]
    await eventually(lambda: device.queued() == 0)
    fresh_broker.kill()
    second = [device.enqueue(Kind.RESULT, {"i": i}) for i in range(50)]
    await asyncio.sleep(0.5)
    fresh_broker.start()
    await eventually(lambda: device.queued() == 0, timeout=30)
    stored = coordinator.store.results_since(device.device_id, 0, 1000)
    assert sorted(r["seq"] for r in stored) == first + second
    assert device.link.mqtt.connects >= 2
