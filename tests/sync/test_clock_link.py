"""The link's clock samples and TTL judgement: SendState's part as a table, then a DeviceLink
with an injected wall clock an hour off against a real broker and coordinator."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from dgdm.sync.broker import Broker
from dgdm.sync.envelope import Kind
from dgdm.sync.link_state import SendState

from .conftest import eventually

HOUR_MS = 3_600_000


def test_only_first_sends_time_a_receipt() -> None:
    state = SendState(receipt_timeout_s=10.0, max_unreceipted=100)
    for seq, at in ((1, 1.0), (2, 2.0), (3, 3.0)):
        state.mark_sent(2, seq, at, kind=1)
        state.advance(2, seq, state.generation)
    assert state.first_send_covered([(1, 2)]) == 2.0  # the latest covered send
    assert state.first_send_covered([(7, 9)]) is None  # nothing of ours
    state.expire(13.5)  # 1..3 overdue: they go again
    state.mark_sent(2, 1, 14.0, kind=1)
    assert state.first_send_covered([(1, 1)]) is None  # a resend: which copy was stored?
    state.reconnected()
    state.mark_sent(2, 2, 15.0, kind=1)
    assert state.first_send_covered([(2, 2)]) is None
    state.receipted([(1, 3)], 16.0)
    state.mark_sent(2, 4, 17.0, kind=1)
    assert state.first_send_covered([(1, 4)]) == 17.0


@pytest.mark.parametrize("device_error_ms", [HOUR_MS, -HOUR_MS])
async def test_an_hour_off_device_judges_ttls_in_coordinator_time(
    mqtt_broker: Broker, sync_rig: Any, device_error_ms: int
) -> None:
    rig = sync_rig(mqtt_broker)
    ran: list[int] = []

    async def on_command(seq: int, body: dict[str, Any]) -> dict[str, Any]:
        ran.append(seq)
        return {"pong": True}

    error = [device_error_ms]
    device = rig.device(
        "skew", on_command=on_command, wall_ms=lambda: time.time_ns() // 1_000_000 + error[0]
    )
    coordinator = await rig.start_coordinator()
    await device.start()
    link = device.link
    assert link.clock_skew_ms() is None  # no receipt yet: its own clock
    for i in range(3):  # an estimate needs two receipts that agree
        device.enqueue(Kind.RESULT, {"i": i})
        await asyncio.sleep(0.3)
    await eventually(lambda: link.clock_skew_ms() is not None, what="an estimate")
    assert abs(link.clock_skew_ms() + device_error_ms) < 1_000
    assert abs(link.coordinator_now_ms() - time.time_ns() // 1_000_000) < 1_000

    live = await coordinator.send_command(device.device_id, "ping", ttl_ms=5_000)
    await eventually(lambda: live in ran, what="a live command executed")

    link.mqtt.pause_reading()
    late = await coordinator.send_command(device.device_id, "ping", ttl_ms=500)
    await asyncio.sleep(1.5)
    link.mqtt.resume_reading()
    await eventually(lambda: link.counters["rejected_expired"] == 1, what="the late one expired")
    assert late not in ran

    error[0] = -device_error_ms  # the wall clock steps two hours the other way
    assert abs(link.clock_skew_ms() - device_error_ms) < 1_000  # seen at once, no receipt
    seqs = [device.enqueue(Kind.RESULT, {"i": i}) for i in range(10, 20)]
    await eventually(lambda: device.queued() == 0, what="all receipted after the step")
    assert link.state.resent_total == 0  # the step neither stalled the link nor resent
    assert len(coordinator.store.results_since(device.device_id, 0, 100)) == 3 + len(seqs)
