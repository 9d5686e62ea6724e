"""Simulated devices for `dgdm bench fleet`: one worker process runs many devices on one
event loop, each the real `Outbox` + `DeviceLink` with its own key, MQTT connection and
enrolment, and enqueues telemetry at a fixed rate as the agent's telemetry loop does.

The parent talks to a worker over a pipe, one tuple per step:
  worker -> ("ready", connected, rss_before, rss_after)
  parent -> ("go", wall-clock start, duration_s, per-device msg/s)
  worker -> ("sent", {device_id: [(seq, enqueued wall ms), ...]}), once every producer
            finished
  worker -> ("drained", messages still in the outboxes, resends), when they are empty or
            `drain_s` passed
  parent -> ("stop",)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONNECT_CONCURRENCY = 100  # in-flight CONNECTs per worker: within mosquitto's listen backlog
# Each Outbox's writer thread wakes every outbox.MAINTENANCE_INTERVAL_S (1 s) when idle, for
# TTL eviction and disk-full recovery, which this bench sets up neither of. A device has
# one such thread; a worker holds 1,000, whose wake-ups then fight the event loop for the
# GIL until keepalives are missed (measured: 5,000 devices, load 750, half disconnected).
OUTBOX_IDLE_TICK_S = 30.0


@dataclass(frozen=True)
class WorkerSpec:
    broker_url: str
    coord_public: str
    devices: list[tuple[str, str]]  # (device_id, private key path)
    outbox_dir: str
    drain_s: float


def run_worker(spec: WorkerSpec, conn: Any) -> None:
    """The worker process's entry point (multiprocessing spawn target)."""
    from dgdm.sync import outbox

    outbox.MAINTENANCE_INTERVAL_S = OUTBOX_IDLE_TICK_S
    asyncio.run(_main(spec, conn))


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class _Device:
    def __init__(self, spec: WorkerSpec, device_id: str, key_path: str) -> None:
        from dgdm.sync.crypto import derive_link_keys, load_private_key, load_public_key, raw_public
        from dgdm.sync.envelope import seal
        from dgdm.sync.link import DeviceLink
        from dgdm.sync.mqtt import MqttOptions
        from dgdm.sync.outbox import Outbox

        own, peer = load_private_key(key_path), load_public_key(spec.coord_public)
        keys = derive_link_keys(own, peer, device_id, raw_public(own), raw_public(peer))

        def sealer(kind: Any, seq: int, created_ms: int, body: Any) -> bytes:
            return seal(kind, seq, created_ms, device_id, body, key=keys.up, key_id=keys.key_id)

        self.device_id = device_id
        # No ballast: it reserves 1 MiB of disk per device for disk-full recovery, which
        # this bench does not exercise (5,000 devices would write 5 GB before starting).
        self.outbox = Outbox(
            Path(spec.outbox_dir) / device_id / "outbox.db",
            device_id=device_id,
            sealer=sealer,
            max_bytes=64 * 2**20,
            ballast_bytes=0,
        )
        options = MqttOptions(url=spec.broker_url, client_id=device_id)
        self.link = DeviceLink(self.outbox, options, device_id=device_id, keys=keys)
        self.seqs: list[tuple[int, int]] = []

    async def produce(self, start_wall: float, duration_s: float, rate: float) -> None:
        from dgdm.sync.envelope import Kind

        loop = asyncio.get_running_loop()
        # Devices start at random phases within one interval, as a real fleet's clocks do.
        interval = 1.0 / rate
        begin = loop.time() + (start_wall - time.time()) + random.uniform(0, interval)  # noqa: S311 - a phase
        end = loop.time() + (start_wall - time.time()) + duration_s
        due = begin
        while due < end:
            await asyncio.sleep(max(0.0, due - loop.time()))
            body = {
                "samples": [
                    {"ts_ms": int(time.time() * 1000), "cpu_percent": 12.5, "mem_used_bytes": 1}
                ]
            }
            seq = await self.link.enqueue(Kind.TELEMETRY, body)
            self.seqs.append((seq, int(time.time() * 1000)))
            due += interval


async def _main(spec: WorkerSpec, conn: Any) -> None:
    rss_before = _rss()
    devices = [_Device(spec, d, k) for d, k in spec.devices]
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def connect(device: _Device) -> bool:
        async with gate:
            await device.link.start()
            with contextlib.suppress(asyncio.TimeoutError):
                await device.link.mqtt.wait_connected(60)
        return device.link.connected

    try:
        connected = sum(await asyncio.gather(*(connect(d) for d in devices)))
        conn.send(("ready", connected, rss_before, _rss()))
        _, start_wall, duration_s, rate = await asyncio.to_thread(conn.recv)
        await asyncio.gather(*(d.produce(start_wall, duration_s, rate) for d in devices))
        conn.send(("sent", {d.device_id: d.seqs for d in devices}))
        pending = await _drain(devices, spec.drain_s)
        resent = sum(d.link.state.resent_total for d in devices)
        conn.send(("drained", pending, resent))
        await asyncio.to_thread(conn.recv)
    finally:
        await asyncio.gather(*(d.link.stop() for d in devices), return_exceptions=True)
        for d in devices:
            d.outbox.close()
        conn.close()


async def _drain(devices: list[_Device], drain_s: float) -> int:
    """Messages still unreceipted once every outbox is empty or `drain_s` passed."""
    deadline = time.monotonic() + drain_s
    while True:
        # The outboxes live in their writer threads' SQLite: poll, there is nothing to await.
        pending = await asyncio.to_thread(lambda: sum(d.outbox.stats().messages for d in devices))
        if pending == 0 or time.monotonic() > deadline:
            return pending
        await asyncio.sleep(0.5)


def outbox_root(base: str | None) -> Path:
    """Where the simulated outboxes go: tmpfs when there is one. Each real device commits to
    its own disk; thousands sharing this machine's one disk would measure its fsyncs."""
    if base:
        return Path(base)
    shm = Path("/dev/shm")  # noqa: S108 - a private mkdtemp is made inside it
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
