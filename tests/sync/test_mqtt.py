"""The asyncio-driven paho transport against a real mosquitto."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from dgdm.sync.broker import Broker
from dgdm.sync.errors import ConfigError, TransportError
from dgdm.sync.mqtt import Backoff, MqttClient, MqttOptions, TokenBucket, Will, parse_broker_url


def _options(broker: Broker, client_id: str, **kw) -> MqttOptions:
    tls = broker.tls
    if tls is not None:
        kw.setdefault("ca_file", tls.ca_file)
        kw.setdefault("cert_file", tls.client_cert)
        kw.setdefault("key_file", tls.client_key)
    return MqttOptions(url=broker.url, client_id=client_id, backoff_initial_s=0.05, **kw)


class Inbox:
    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self.changed = asyncio.Event()

    def __call__(self, topic: str, payload: bytes) -> None:
        self.items.append((topic, payload))
        self.changed.set()

    async def wait_for(self, n: int, timeout: float = 10.0) -> None:
        async def _wait() -> None:
            while len(self.items) < n:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(_wait(), timeout)


async def _pair(broker: Broker, name: str, topic: str, **kw):
    inbox = Inbox()
    sub = MqttClient(
        _options(broker, f"{name}-sub", **kw), on_message=inbox, subscriptions=((topic, 1),)
    )
    pub = MqttClient(_options(broker, f"{name}-pub", **kw))
    for client in (sub, pub):
        await client.start()
        await client.wait_connected(5)
    await asyncio.sleep(0.1)  # let the SUBACK land before publishing
    return sub, pub, inbox


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_pipelined_publishes_are_all_acknowledged_and_delivered(
    mqtt_broker: Broker, unique_id: str, version: str
) -> None:
    topic = f"t/{unique_id}"
    sub, pub, inbox = await _pair(
        mqtt_broker, unique_id, topic, mqtt_version=version, max_inflight=50
    )
    try:
        futures = [await pub.publish(topic, b"%05d" % i) for i in range(2000)]
        assert pub.inflight <= 50
        await asyncio.wait_for(asyncio.gather(*futures), 10)
        await inbox.wait_for(2000)
        assert sorted(p for _, p in inbox.items) == [b"%05d" % i for i in range(2000)]
    finally:
        await pub.stop()
        await sub.stop()


async def test_mutual_tls(tls_broker: Broker, unique_id: str) -> None:
    topic = f"t/{unique_id}"
    sub, pub, inbox = await _pair(tls_broker, unique_id, topic)
    try:
        await asyncio.wait_for(await pub.publish(topic, b"x" * 300), 5)
        await inbox.wait_for(1)
    finally:
        await pub.stop()
        await sub.stop()


async def test_tls_without_client_certificate_is_refused(tls_broker: Broker, unique_id) -> None:
    client = MqttClient(_options(tls_broker, unique_id, cert_file=None, key_file=None))
    await client.start()
    try:
        with pytest.raises(TransportError):
            await client.wait_connected(1.0)
        assert client.last_error
    finally:
        await client.stop()


async def test_will_is_published_when_the_link_dies(fresh_broker: Broker, unique_id) -> None:
    topic = f"s/{unique_id}"
    inbox = Inbox()
    watcher = MqttClient(
        _options(fresh_broker, f"{unique_id}-w"), on_message=inbox, subscriptions=((topic, 1),)
    )
    will = Will(topic, b'{"state":"offline"}')
    device = MqttClient(_options(fresh_broker, unique_id, will=will, keepalive_s=1))
    await watcher.start()
    await device.start()
    await watcher.wait_connected(5)
    await device.wait_connected(5)
    # Stop without DISCONNECT, like a power cut: the broker sends the will.
    await device.stop(send_disconnect=False)
    await inbox.wait_for(1, timeout=10)
    assert inbox.items[0] == (topic, b'{"state":"offline"}')
    await watcher.stop()


async def test_reconnects_after_broker_kill_and_fails_unacked(
    fresh_broker: Broker, unique_id
) -> None:
    client = MqttClient(_options(fresh_broker, unique_id, keepalive_s=2))
    await client.start()
    await client.wait_connected(5)
    fresh_broker.kill()
    await asyncio.wait_for(client.wait_disconnected(), 5)
    with pytest.raises(TransportError):
        await client.publish("t/x", b"1")
    fresh_broker.start()
    await client.wait_connected(10)
    assert client.connects == 2
    await asyncio.wait_for(await client.publish("t/x", b"2"), 5)
    await client.stop()


async def test_bandwidth_cap_limits_throughput(mqtt_broker: Broker, unique_id: str) -> None:
    client = MqttClient(_options(mqtt_broker, unique_id, bandwidth_bytes_per_s=20_000))
    await client.start()
    await client.wait_connected(5)
    start = time.monotonic()
    futures = [await client.publish(f"t/{unique_id}", b"x" * 1000) for _ in range(60)]
    await asyncio.gather(*futures)
    elapsed = time.monotonic() - start
    # 60 kB at 20 kB/s with a one-second burst: at least ~2 s.
    assert elapsed >= 1.8
    await client.stop()


def test_backoff_full_jitter_grows_to_the_cap() -> None:
    b = Backoff(0.5, 8.0, random.Random(1))
    delays = [b.next_delay() for _ in range(20)]
    assert all(0 <= d <= 8.0 for d in delays)
    assert max(delays[:1]) <= 0.5
    assert max(delays[6:]) > 2.0  # the ceiling has grown past the start
    b.reset()
    assert b.next_delay() <= 0.5


def test_token_bucket() -> None:
    bucket = TokenBucket(1000, now=0.0)
    assert bucket.reserve(1000, 0.0) == 0.0
    assert bucket.reserve(500, 0.0) == pytest.approx(0.5)
    assert bucket.reserve(500, 2.0) == 0.0  # refilled (capped at one second)
    # A message bigger than the burst waits for a full bucket, not forever.
    assert bucket.reserve(5000, 2.0) == pytest.approx(0.5)


@pytest.mark.parametrize("url", ["http://x", "mqtt://", "mqtt://h:99999", "tcp://h:1"])
def test_bad_broker_url_names_the_key(url: str) -> None:
    with pytest.raises(ConfigError, match=r"sync\.broker_url"):
        parse_broker_url(url)


def test_broker_url_defaults() -> None:
    assert parse_broker_url("mqtts://example.org").port == 8883
    assert parse_broker_url("mqtt://h:1884").tls is False
