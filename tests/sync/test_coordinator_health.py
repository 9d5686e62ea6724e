"""Coordinator /healthz (SPEC §7.1): 200 when the store and the broker answer, else 503 naming
the failing check; while the store is down nothing is receipted (devices keep their
messages) and ingest resumes by itself when it returns. Real PostgreSQL, real mosquitto."""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request
from typing import Any

from dgdm.sync.coordinator.config import StoreSection
from dgdm.sync.coordinator.service import Coordinator
from dgdm.sync.envelope import Kind

from .conftest import eventually


def healthz(coordinator: Coordinator) -> tuple[int, dict[str, Any]]:
    return get(coordinator, "/healthz")  # no token needed: it is open


def get(coordinator: Coordinator, path: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{coordinator.http_port}{path}")
    if coordinator.config.http.token:
        request.add_header("Authorization", f"Bearer {coordinator.config.http.token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


async def test_healthz_names_the_broker_when_it_is_gone(sync_rig: Any, fresh_broker: Any) -> None:
    rig = sync_rig(fresh_broker)
    coordinator = await rig.start_coordinator()
    assert healthz(coordinator) == (
        200,
        {"status": "ok", "checks": {"store": "ok", "broker": "ok"}},
    )
    assert coordinator.metrics.value("dgdm_coordinator_mqtt_connected") == 1
    fresh_broker.stop()
    await eventually(lambda: healthz(coordinator)[0] == 503, what="503 without a broker")
    _, body = healthz(coordinator)
    assert body["checks"]["broker"].startswith("failing")
    assert body["checks"]["store"] == "ok"
    assert coordinator.metrics.value("dgdm_coordinator_mqtt_connected") == 0


async def test_postgres_down_pauses_ingest_without_receipts_and_it_resumes(
    sync_rig: Any, mqtt_broker: Any, fresh_pg: Any, monkeypatch: Any
) -> None:
    monkeypatch.setenv("DGDM_TEST_PG_PASSWORD", fresh_pg.password)
    rig = sync_rig(mqtt_broker)
    device = rig.device("d1", receipt_timeout_s=2.0)
    store = StoreSection(
        url=fresh_pg.url(fresh_pg.create_database()), password="env:DGDM_TEST_PG_PASSWORD"
    )
    coordinator = Coordinator(dataclasses.replace(rig.config(), store=store))
    await coordinator.start()
    rig.coordinator = coordinator
    await coordinator.add_device(device.device_id, device.public_b64)
    await coordinator.wait_connected(10)
    await device.start()
    device.enqueue(Kind.RESULT, {"n": 1})
    await eventually(lambda: device.queued() == 0, what="first result receipted")
    assert healthz(coordinator)[0] == 200

    fresh_pg.stop(immediate=True)
    started = time.monotonic()
    await eventually(
        lambda: healthz(coordinator)[0] == 503, timeout=30, what="503 without the store"
    )
    _, body = healthz(coordinator)
    assert body["checks"]["store"].startswith("failing")
    # An API read that needs the store answers 503 naming it (not a 500 with a traceback).
    status, body = get(coordinator, f"/devices/{device.device_id}")
    assert (status, body["field"]) == (503, "store"), body
    print(f"/healthz 503 {time.monotonic() - started:.1f} s after the store went away")
    device.enqueue(Kind.RESULT, {"n": 2})
    device.enqueue(Kind.ALERT, {"code": "x"})
    await eventually(
        lambda: (
            coordinator.metrics.value("dgdm_coordinator_rejects_total", reason="store_unavailable")
            >= 1
        ),
        timeout=30,
        what="a batch failed on the missing store",
    )
    assert device.queued() == 2  # nothing receipted while the store is down
    assert coordinator.metrics.value("dgdm_coordinator_store_up") == 0

    fresh_pg.start()
    await eventually(lambda: device.queued() == 0, timeout=60, what="ingest resumed by itself")
    assert healthz(coordinator)[0] == 200
    assert coordinator.metrics.value("dgdm_coordinator_store_up") == 1
    rows = await coordinator.results_since(device.device_id, 0, 10)
    assert sorted(r["body"]["n"] for r in rows) == [1, 2]
