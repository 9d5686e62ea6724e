"""`dgdm bench sync`: the transport ceiling, the full sync path, the drain, the enqueue rate.

One run on a private loopback mosquitto:
1. raw: plain paho, QoS 1, 300-byte payloads, one publisher process -> one subscriber
   process; the rate at which the subscriber has them all (the transport ceiling);
2. full: producers enqueue (seal + durable outbox) while the link drains to a coordinator
   in another process, which stores and receipts; rate until the outbox is empty again;
3. drain: 100,000 messages queued while offline, then the link connects: time to empty;
4. enqueue: durable enqueue rate (`dgdm.sync.bench_outbox.bench_enqueue`): the agent's path
   (`enqueue_async` from coroutines) and, for comparison, per-call threads.
Resends in runs 2 and 3 (receipt timeouts, receipt gaps, coordinator presence) are counted:
each is a duplicate at the coordinator unless the first copy was lost, and nothing is lost
here, so they must stay <= 1 % of the messages.
The raw run is paho as fast as it goes by itself: its own loop_read/loop_write in the
process's only thread, a 1,000-message window, no paho limits, same MQTT 5 as the link.
Targets: full >= 50 % of raw, drain <= 20 s, enqueue >= 20,000 msg/s.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

PAYLOAD_BYTES = 300
RAW_WINDOW = 1000
PRODUCERS = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", type=int, default=20_000, help="per raw/full run")
    parser.add_argument("--drain", type=int, default=100_000, help="messages queued offline")
    parser.add_argument("--repeat", type=int, default=3, help="raw/full runs (median reported)")
    parser.add_argument("--quick", action="store_true", help="small smoke-test sizes")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    if getattr(args, "quick", False):
        args.messages, args.drain, args.repeat = 2_000, 5_000, 1
    with tempfile.TemporaryDirectory(prefix="dgdm-bench-sync-") as tmp:
        report = run(Path(tmp), args.messages, args.drain, args.repeat)
    if getattr(args, "json", False):
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0


def run(root: Path, messages: int, drain: int, repeat: int) -> dict[str, Any]:
    from dgdm.sync.broker import Broker

    ctx = mp.get_context("spawn")
    with Broker(root / "broker") as broker:
        raw = [_raw_once(ctx, broker.url, messages, i) for i in range(repeat)]
        full, drain_s, resent = asyncio.run(
            _sync_runs(ctx, root, broker.url, n=messages, drain=drain, repeat=repeat)
        )
    rates = _enqueue_rates(root)
    enqueue = rates["msg_s"]
    raw_rate, full_rate = statistics.median(raw), statistics.median(full)
    resent_pct = 100 * resent / max(1, messages * repeat + drain)
    return {
        "payload_bytes": PAYLOAD_BYTES,
        "messages": messages,
        "raw_msg_s": round(raw_rate),
        "raw_runs": [round(r) for r in raw],
        "full_msg_s": round(full_rate),
        "full_runs": [round(r) for r in full],
        "full_over_raw": round(full_rate / raw_rate, 3),
        "drain_messages": drain,
        "drain_s": round(drain_s, 2),
        "drain_msg_s": round(drain / drain_s),
        "resent": resent,
        "resent_pct": round(resent_pct, 3),
        "enqueue_msg_s": round(enqueue),
        "enqueue_threads_msg_s": round(rates["grouped_msg_s"]),
        "enqueue_many_msg_s": round(rates["enqueue_many_msg_s"]),
        "single_commit_msg_s": round(rates["single_commit_msg_s"]),
        "load_average": os.getloadavg(),
        "targets": {
            "full_over_raw>=0.5": full_rate / raw_rate >= 0.5,
            "drain_100k<=20s": drain_s * 100_000 / max(drain, 1) <= 20,
            "enqueue>=20000": enqueue >= 20_000,
            "resent<=1%": resent_pct <= 1.0,
        },
    }


def _print(report: dict[str, Any]) -> None:
    print(f"raw paho QoS 1 pub->sub ({report['payload_bytes']} B): {report['raw_msg_s']} msg/s")
    print(f"full path enqueue->store->receipt->delete: {report['full_msg_s']} msg/s")
    print(f"full / raw: {report['full_over_raw']:.0%}")
    print(f"drain {report['drain_messages']} after an outage: {report['drain_s']} s")
    print(f"resent (duplicates at most): {report['resent']} ({report['resent_pct']}%)")
    print(
        f"durable enqueue: {report['enqueue_msg_s']} msg/s async (agent path), "
        f"{report['enqueue_threads_msg_s']} per-call threads, "
        f"{report['enqueue_many_msg_s']} enqueue_many, "
        f"{report['single_commit_msg_s']} one FULL commit per row"
    )
    print(f"load average at the end: {report['load_average']}")
    print("targets met: " + json.dumps(report["targets"]))


# -- 1. raw paho --------------------------------------------------------------------------


def _raw_once(ctx: Any, url: str, n: int, run_id: int) -> float:
    ready, done = ctx.Event(), ctx.Queue()
    sub = ctx.Process(target=_raw_subscriber, args=(url, n, f"bench/raw/{run_id}", ready, done))
    sub.start()
    try:
        if not ready.wait(10):
            raise RuntimeError("raw subscriber did not connect")
        go, started = ctx.Event(), ctx.Queue()
        pub = ctx.Process(target=_raw_publisher, args=(url, n, f"bench/raw/{run_id}", go, started))
        pub.start()
        go.set()
        start = started.get(timeout=60)
        end = done.get(timeout=120)
        pub.join(30)
    finally:
        sub.join(5)
        if sub.is_alive():
            sub.kill()
    return n / (end - start)


def _paho(url: str, client_id: str) -> Any:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from dgdm.sync.mqtt import parse_broker_url

    end = parse_broker_url(url)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    # No paho window or queue limits: the publisher below keeps its own window.
    client.max_inflight_messages_set(0)
    client.max_queued_messages_set(0)
    client.connect(end.host, end.port)
    return client


def _pump(client: Any, timeout: float) -> None:
    """One turn of paho's own I/O in this thread (no loop_start thread, no socketpair):
    wait for the socket, read every packet waiting, write whatever paho has queued."""
    import select

    sock = client.socket()
    readable, _, _ = select.select([sock], [sock] if client.want_write() else [], [], timeout)
    while readable:
        client.loop_read()
        readable, _, _ = select.select([sock], [], [], 0)
    if client.want_write():
        client.loop_write()


def _raw_subscriber(url: str, n: int, topic: str, ready: Any, done: Any) -> None:
    count = 0
    client = _paho(url, f"raw-sub-{os.getpid()}")

    def on_message(*_: Any) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.put(time.monotonic())

    client.on_message = on_message
    client.on_subscribe = lambda *_: ready.set()
    client.subscribe(topic, qos=1)
    while count < n:
        _pump(client, 1.0)
    client.disconnect()


def _raw_publisher(url: str, n: int, topic: str, go: Any, started: Any) -> None:
    acked = 0

    def on_publish(*_: Any) -> None:
        nonlocal acked
        acked += 1

    client = _paho(url, f"raw-pub-{os.getpid()}")
    client.on_publish = on_publish
    while not client.is_connected():
        _pump(client, 0.1)
    payload = os.urandom(PAYLOAD_BYTES)
    go.wait()
    started.put(time.monotonic())
    sent = 0
    while acked < n:
        # Keep RAW_WINDOW publishes in flight; paho writes each one as it is queued.
        while sent < n and sent - acked < RAW_WINDOW:
            client.publish(topic, payload, qos=1)
            sent += 1
        _pump(client, 0.05)
    client.disconnect()


# -- 2./3. the full path -------------------------------------------------------------------


def _coordinator_proc(config: Any, device_id: str, public_b64: str, ready: Any, stop: Any) -> None:
    async def main() -> None:
        from dgdm.sync.coordinator.service import Coordinator

        coordinator = Coordinator(config)
        await coordinator.start(http=False)
        await coordinator.add_device(device_id, public_b64)
        await coordinator.wait_connected(10)
        ready.set()
        await asyncio.to_thread(stop.wait)
        await coordinator.stop()

    asyncio.run(main())


def _coordinator_config(root: Path, url: str, key: Path) -> Any:
    from dgdm.sync.coordinator.config import (
        CoordinatorConfig,
        CoordinatorSection,
        HttpSection,
        IngestSection,
        MqttSection,
    )

    # One device is the whole fleet here: its quota and queue are the fleet's, so that the
    # bench measures the sync path, not the fair-share limits (bench fleet measures those).
    ingest = IngestSection(
        telemetry_per_s=1e6,
        bytes_per_s=1 << 30,
        device_queue_messages=200_000,
        device_queue_bytes=1 << 30,
        queue_bytes=1 << 30,
    )
    return CoordinatorConfig(
        CoordinatorSection(id="bench", data_dir=root / "coordinator", private_key=key),
        MqttSection(broker_url=url, client_id="bench-coordinator"),
        HttpSection(port=0),
        ingest=ingest,
    )


class _Device:
    def __init__(self, root: Path, url: str, coord_public: str, name: str) -> None:
        from dgdm.sync.crypto import (
            derive_link_keys,
            generate_keypair,
            load_private_key,
            load_public_key,
            raw_public,
        )
        from dgdm.sync.envelope import seal
        from dgdm.sync.outbox import Outbox

        self.device_id = name
        key_path, _, self.public_b64 = generate_keypair(root / name)
        own, peer = load_private_key(key_path), load_public_key(coord_public)
        keys = derive_link_keys(own, peer, name, raw_public(own), raw_public(peer))
        self.keys = keys

        def sealer(kind: Any, seq: int, created_ms: int, body: Any) -> bytes:
            return seal(kind, seq, created_ms, name, body, key=keys.up, key_id=keys.key_id)

        self.outbox = Outbox(
            root / name / "outbox.db", device_id=name, sealer=sealer, max_bytes=2**30
        )
        self.url = url

    def link(self) -> Any:
        from dgdm.sync.link import DeviceLink
        from dgdm.sync.mqtt import MqttOptions

        options = MqttOptions(url=self.url, client_id=f"bench-{self.device_id}")
        return DeviceLink(self.outbox, options, device_id=self.device_id, keys=self.keys)

    async def fill(self, n: int, link: Any = None) -> None:
        """PRODUCERS coroutines enqueue n messages, as the agent does: through the running
        link's `enqueue` (`enqueue_async`, then a wake-up of the sender), or straight through
        `enqueue_async` while no link runs."""
        from dgdm.sync.envelope import Kind

        # ~300 bytes sealed: incompressible text, so zlib does not shrink it.
        body = {"pad": base64.b64encode(os.urandom(180)).decode()}
        enqueue = self.outbox.enqueue_async if link is None else link.enqueue

        async def produce(count: int) -> None:
            for _ in range(count):
                await enqueue(Kind.TELEMETRY, body)

        share = [n // PRODUCERS + (i < n % PRODUCERS) for i in range(PRODUCERS)]
        await asyncio.gather(*(produce(c) for c in share))


async def _sync_runs(
    ctx: Any, root: Path, url: str, *, n: int, drain: int, repeat: int
) -> tuple[list[float], float, int]:
    from dgdm.sync.crypto import generate_keypair

    coord_key, _, coord_public = generate_keypair(root / "coord", name="coordinator")
    device = _Device(root, url, coord_public, "bench-device")
    ready, stop = ctx.Event(), ctx.Event()
    config = _coordinator_config(root, url, coord_key)
    proc = ctx.Process(
        target=_coordinator_proc, args=(config, device.device_id, device.public_b64, ready, stop)
    )
    proc.start()
    try:
        if not await asyncio.to_thread(ready.wait, 30):
            raise RuntimeError("bench coordinator did not start")
        link = device.link()
        await link.start()
        await link.mqtt.wait_connected(10)
        full = [await _full_once(device, link, n) for _ in range(repeat)]
        resent = link.state.resent_total
        await link.stop()
        drain_s, drain_resent = await _drain_once(device, drain)
    finally:
        stop.set()
        await asyncio.to_thread(proc.join, 30)
        device.outbox.close()
    return full, drain_s, resent + drain_resent


async def _wait_empty(device: _Device) -> None:
    # The outbox lives in another thread's SQLite: poll it, there is nothing to await.
    while device.outbox.stats().messages:  # noqa: ASYNC110
        await asyncio.sleep(0.02)


async def _full_once(device: _Device, link: Any, n: int) -> float:
    start = time.monotonic()
    await device.fill(n, link)
    await _wait_empty(device)
    return n / (time.monotonic() - start)


async def _drain_once(device: _Device, n: int) -> tuple[float, int]:
    await device.fill(n)
    link = device.link()
    start = time.monotonic()
    await link.start()
    await _wait_empty(device)
    elapsed = time.monotonic() - start
    await link.stop()
    return elapsed, link.state.resent_total


# -- 4. enqueue ------------------------------------------------------------------------------


def _enqueue_rates(root: Path) -> dict[str, Any]:
    """The agent's path (`enqueue_async`, coroutines) as msg_s, and the thread paths."""
    from dgdm.sync.bench_outbox import bench_enqueue

    return bench_enqueue(root / "enqueue")
