"""Two coordinator replicas on one PostgreSQL store, a real broker and a real device: the
resend round publishes each unreplied command once a round between them (not once per
replica), and a command still arrives, and runs once, when its publish was lost, even
the publish of a replica that claimed the resend and then died."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dgdm.sync.coordinator.commands import MAX_TTL_MS
from dgdm.sync.coordinator.config import StoreSection
from dgdm.sync.coordinator.service import RESEND_AFTER_MS, RESEND_BATCH, Coordinator

from .conftest import Rig, eventually, online

PING = {"cmd": "ping", "args": {}, "ttl_ms": 600_000}
PASSWORD_ENV = "DGDM_TEST_RESEND_PG_PASSWORD"


@pytest.fixture
def pg_store(pg_cluster: Any, pg_database: str, monkeypatch: pytest.MonkeyPatch) -> StoreSection:
    monkeypatch.setenv(PASSWORD_ENV, pg_cluster.password)
    return StoreSection(url=pg_cluster.url(pg_database), password=f"env:{PASSWORD_ENV}")


@pytest.fixture
async def replicas(
    mqtt_broker: Any, sync_rig: Any, pg_store: StoreSection
) -> AsyncIterator[tuple[Rig, Coordinator, Coordinator]]:
    """The rig's coordinator and a second replica of it (its own id, client and data dir)."""
    rig = sync_rig(mqtt_broker, pg_store)
    first = await rig.start_coordinator()
    config = rig.config()
    section = dataclasses.replace(config.coordinator, id="r2", data_dir=rig.root / "r2")
    mqtt = dataclasses.replace(config.mqtt, client_id=f"{config.mqtt.client_id}-2")
    second = Coordinator(dataclasses.replace(config, coordinator=section, mqtt=mqtt))
    await second.start(http=False)
    await second.wait_connected(10)
    try:
        yield rig, first, second
    finally:
        await second.stop()


async def _device_online(rig: Rig, on_command: Any, *coordinators: Coordinator) -> str:
    device = rig.device("d", on_command=on_command)
    await rig.enrol(device)
    for coordinator in coordinators:
        await coordinator.run_on_writer(coordinator.registry.reload)  # type: ignore[union-attr]
    await device.start()
    await online(coordinators[0], device.device_id)
    await eventually(
        lambda: all(c.metrics.value("dgdm_devices_online") == 1 for c in coordinators),
        what="both replicas see the device online",
    )
    return device.device_id


def _resent(*coordinators: Coordinator) -> float:
    return sum(c.metrics.value("dgdm_coordinator_commands_resent_total") for c in coordinators)


async def test_two_replicas_resend_each_unreplied_command_once_a_round(replicas: Any) -> None:
    """Commands stored and never published (lost publishes), on a device that holds its
    first command unanswered so that none is replied while the rounds run."""
    rig, first, second = replicas
    release = asyncio.Event()
    calls: list[int] = []

    async def on_command(seq: int, body: dict[str, Any]) -> dict[str, Any]:
        calls.append(seq)
        await release.wait()
        return {"pong": True}

    device_id = await _device_online(rig, on_command, first, second)
    now = time.time_ns() // 1_000_000
    seqs = [first.store.new_command(device_id, PING, now) for _ in range(5)]
    round_ms = now + RESEND_AFTER_MS + 1
    for _ in range(2):
        sent = await asyncio.gather(
            first.resend_commands(round_ms), second.resend_commands(round_ms)
        )
        assert sum(sent) == len(seqs)  # each once between the two, not once per replica
        late = round_ms + RESEND_AFTER_MS - 1  # the same round, a replica a little later
        assert await second.resend_commands(late) == 0
        assert await first.resend_commands(late) == 0
        assert all(first.store.command(device_id, s)["status"] == "pending" for s in seqs)
        round_ms += RESEND_AFTER_MS
    assert _resent(first, second) == 2 * len(seqs)
    release.set()
    await eventually(
        lambda: all(first.store.command(device_id, s)["status"] == "replied" for s in seqs),
        what="every command replied",
    )
    assert sorted(calls) == seqs  # each ran once; the second round's copies were dropped


async def test_a_resend_whose_publish_was_lost_goes_out_in_the_next_round(replicas: Any) -> None:
    """The command's own publish was lost, and so was the resend of the replica that claimed
    it (claimed, then killed before it published): the other replica skips it for that
    round and publishes it in the next; the device runs it once."""
    rig, first, second = replicas
    calls: list[int] = []

    async def on_command(seq: int, body: dict[str, Any]) -> dict[str, Any]:
        calls.append(seq)
        return {"pong": True}

    device_id = await _device_online(rig, on_command, first, second)
    now = time.time_ns() // 1_000_000
    seq = first.store.new_command(device_id, PING, now)
    round_ms = now + RESEND_AFTER_MS + 1
    since, until = round_ms - MAX_TTL_MS, round_ms - RESEND_AFTER_MS
    [claimed] = first.store.claim_resends(since, until, RESEND_BATCH, round_ms, lambda _: True)
    assert claimed["seq"] == seq  # and never published: that replica died here
    assert await second.resend_commands(round_ms + 1) == 0
    assert await second.resend_commands(round_ms + RESEND_AFTER_MS) == 1
    await eventually(
        lambda: first.store.command(device_id, seq)["status"] == "replied",
        what="the command replied",
    )
    assert calls == [seq]
