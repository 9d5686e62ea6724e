"""Outbox -> mosquitto -> coordinator -> receipts -> outbox deletes, for every kind."""

from __future__ import annotations

import pytest

from dgdm.sync.envelope import Kind

from .conftest import eventually, online

BODIES = {
    Kind.RESULT: {"job_id": "j", "graph_id": "g", "node_ids": ["a"], "embedding": {}},
    Kind.TELEMETRY: {"samples": [{"ts_ms": 1, "cpu_percent": 3.5}]},
    Kind.ALERT: {"code": "c", "severity": "warning", "message": "m", "details": {}},
    Kind.REPLY: {"cmd_seq": 99, "ok": True, "error": None, "data": None},
}


@pytest.mark.parametrize("broker_name", ["mqtt_broker", "tls_broker"])
async def test_every_kind_is_stored_once_and_receipted(
    request, sync_rig, broker_name, rig_store
) -> None:
    broker = request.getfixturevalue(broker_name)
    rig = sync_rig(broker, rig_store)
    device = rig.device("d")
    coordinator = await rig.start_coordinator()
    await device.start()
    seqs = {kind: [device.enqueue(kind, body) for _ in range(5)] for kind, body in BODIES.items()}
    await eventually(lambda: device.queued() == 0, what="outbox drained by receipts")
    # The rows go in a thread; the count follows when its coroutine next runs.
    await eventually(lambda: device.link.counters["receipted"] >= 20, what="receipts counted")
    store = coordinator.store
    assert store.count() == 20
    results = store.results_since(device.device_id, 0, 100)
    assert [r["seq"] for r in results] == seqs[Kind.RESULT]
    assert results[0]["body"] == BODIES[Kind.RESULT]
    assert coordinator.metrics.value("dgdm_messages_in_total", kind="alert") == 5
    assert device.link.counters["receipted"] == 20
    await online(coordinator, device.device_id)
