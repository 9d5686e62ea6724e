"""Sync fixtures: a coordinator on a real broker and devices with real outboxes and links.

`sync_rig(broker)` (a factory fixture) gives a `Rig` with coordinator keys and config;
`await rig.start_coordinator()`, `rig.device(id)` -> Device (outbox + link, not started),
`await device.start()`. Everything started is stopped at the end of the test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from dgdm.sync.broker import Broker
from dgdm.sync.coordinator.config import (
    CoordinatorConfig,
    CoordinatorSection,
    HttpSection,
    MqttSection,
    StoreSection,
)
from dgdm.sync.coordinator.service import Coordinator
from dgdm.sync.crypto import (
    derive_link_keys,
    generate_keypair,
    load_private_key,
    load_public_key,
    raw_public,
)
from dgdm.sync.envelope import Kind, seal
from dgdm.sync.link import DeviceLink
from dgdm.sync.mqtt import MqttOptions
from dgdm.sync.outbox import Outbox


async def eventually(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.02)


async def online(coordinator: Coordinator, *device_ids: str, timeout: float = 15.0) -> None:
    """Wait until the coordinator's store shows these devices online (what its HTTP API and
    its jobs read: the status row is written by the writer thread)."""
    deadline = time.monotonic() + timeout
    while not set(device_ids) <= {
        v["device_id"] for v in await coordinator.device_views(None, True, None)
    }:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {device_ids} to be online")
        await asyncio.sleep(0.02)


def mqtt_options(broker: Broker, client_id: str, **kw: Any) -> MqttOptions:
    if broker.tls is not None:
        kw.setdefault("ca_file", broker.tls.ca_file)
        kw.setdefault("cert_file", broker.tls.client_cert)
        kw.setdefault("key_file", broker.tls.client_key)
    kw.setdefault("backoff_initial_s", 0.05)
    kw.setdefault("backoff_max_s", 1.0)
    return MqttOptions(url=broker.url, client_id=client_id, **kw)


@dataclasses.dataclass
class Device:
    device_id: str
    keys: Any
    public_b64: str
    outbox: Outbox
    link: DeviceLink

    async def start(self) -> None:
        await self.link.start()
        await self.link.mqtt.wait_connected(10)

    def enqueue(self, kind: Kind, body: dict[str, Any]) -> int:
        seq = self.outbox.enqueue(kind, body)
        self.link.wake()
        return seq

    def queued(self) -> int:
        return self.outbox.stats().messages


class Rig:
    def __init__(
        self, broker: Broker, root: Path, tag: str, store: StoreSection | None = None
    ) -> None:
        self.broker = broker
        self.store = store or StoreSection()
        self.root = root
        self.tag = tag
        self.coord_key, _, self.coord_public_b64 = generate_keypair(root / "coord", name="coord")
        self.coordinator: Coordinator | None = None
        self.devices: list[Device] = []

    def config(self, **coord: Any) -> CoordinatorConfig:
        tls = self.broker.tls
        mqtt = MqttSection(
            broker_url=self.broker.url,
            mqtt_version=coord.pop("mqtt_version", "5"),
            client_id=f"coord-{self.tag}",
            share_group=f"g{self.tag}"[:64],
            ca_file=tls.ca_file if tls else None,
            cert_file=tls.client_cert if tls else None,
            key_file=tls.client_key if tls else None,
        )
        section = CoordinatorSection(
            id=self.tag, data_dir=self.root / "coord-data", private_key=self.coord_key, **coord
        )
        http = HttpSection(bind="127.0.0.1", port=0, token="tok")
        return CoordinatorConfig(section, mqtt, http, store=self.store)

    async def start_coordinator(self, **coord: Any) -> Coordinator:
        coordinator = Coordinator(self.config(**coord))
        await coordinator.start()
        for device in self.devices:
            await coordinator.add_device(device.device_id, device.public_b64)
        await coordinator.wait_connected(10)
        self.coordinator = coordinator
        return coordinator

    async def stop_coordinator(self) -> None:
        if self.coordinator is not None:
            await self.coordinator.stop()
            self.coordinator = None

    def device(self, name: str, *, on_command: Any = None, **link: Any) -> Device:
        device_id = f"{self.tag}-{name}"[:64]
        key_path, _, public_b64 = generate_keypair(self.root / device_id, name="device")
        own = load_private_key(key_path)
        peer = load_public_key(self.coord_public_b64)
        keys = derive_link_keys(own, peer, device_id, raw_public(own), raw_public(peer))

        def sealer(kind: Kind, seq: int, created_ms: int, body: Any) -> bytes:
            return seal(kind, seq, created_ms, device_id, body, key=keys.up, key_id=keys.key_id)

        outbox = Outbox(
            self.root / device_id / "outbox.db",
            device_id=device_id,
            sealer=sealer,
            max_bytes=64 * 1024 * 1024,
        )
        options = mqtt_options(self.broker, f"dev-{device_id}", **link.pop("mqtt", {}))
        dev_link = DeviceLink(
            outbox,
            options,
            device_id=device_id,
            keys=keys,
            on_command=on_command,
            agent_version="test",
            backend="numpy",
            **link,
        )
        device = Device(device_id, keys, public_b64, outbox, dev_link)
        self.devices.append(device)
        return device

    async def enrol(self, device: Device) -> None:
        assert self.coordinator is not None
        await self.coordinator.add_device(device.device_id, device.public_b64)

    async def close(self) -> None:
        for device in self.devices:
            await device.link.stop()
            device.outbox.close()
        await self.stop_coordinator()


@pytest.fixture
async def sync_rig(tmp_path: Path, unique_id: str) -> AsyncIterator[Callable[[Broker], Rig]]:
    rigs: list[Rig] = []

    def make(broker: Broker, store: StoreSection | None = None) -> Rig:
        rig = Rig(broker, tmp_path / f"rig{len(rigs)}", f"{unique_id}{len(rigs)}"[-40:], store)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        await rig.close()


@pytest.fixture(params=["sqlite", "postgres"])
def rig_store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> StoreSection:
    """Run a coordinator test on either store: `sync_rig(broker, rig_store)`, or a store's
    own tests on a config with it. PostgreSQL is a fresh database in the session's private
    cluster (tests/pg.py)."""
    if request.param == "sqlite":
        return StoreSection()
    cluster = request.getfixturevalue("pg_cluster")
    monkeypatch.setenv("DGDM_TEST_PG_PASSWORD", cluster.password)
    return StoreSection(
        url=cluster.url(cluster.create_database()), password="env:DGDM_TEST_PG_PASSWORD"
    )
