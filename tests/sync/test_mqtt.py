"""The asyncio-driven paho transport against a real mosquitto."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from dgdm.sync.broker import Broker
from dgdm.sync.errors import ConfigError, TransportError
from dgdm.sync.mqtt import Backoff, MqttClient, MqttOptions, TokenBucket, Will, parse_broker_url
from dgdm.sync.mqtt_wire import LeanWire, PahoWire

from .conftest import eventually

_WIRE = {"name": "lean"}  # what `_options` asks for unless told otherwise


@pytest.fixture(params=["lean", "paho"])
def wire(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test over the lean wire and over stock paho (`MqttOptions.wire`)."""
    monkeypatch.setitem(_WIRE, "name", request.param)
    return str(request.param)


def _options(broker: Broker, client_id: str, **kw) -> MqttOptions:
    tls = broker.tls
    if tls is not None:
        kw.setdefault("ca_file", tls.ca_file)
        kw.setdefault("cert_file", tls.client_cert)
        kw.setdefault("key_file", tls.client_key)
    kw.setdefault("wire", _WIRE["name"])
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
    mqtt_broker: Broker, unique_id: str, version: str, wire: str
) -> None:
    topic = f"t/{unique_id}"
    sub, pub, inbox = await _pair(
        mqtt_broker, unique_id, topic, mqtt_version=version, max_inflight=50
    )
    try:
        assert pub._conn is not None
        assert isinstance(pub._conn.wire, LeanWire if wire == "lean" else PahoWire)
        futures = [await pub.publish(topic, b"%05d" % i) for i in range(1000)]
        assert pub.inflight <= 50
        for i in range(1000, 2000):
            await pub.send(topic, b"%05d" % i)
            assert pub.inflight <= 50
        await asyncio.wait_for(asyncio.gather(*futures), 10)
        await inbox.wait_for(2000)
        # One publisher, one subscriber, QoS 1: the broker keeps the order.
        assert [p for _, p in inbox.items] == [b"%05d" % i for i in range(2000)]
        await eventually(lambda: pub.inflight == 0, 5, "the last PUBACKs")
        assert (pub.acked, pub.rejected) == (2000, 0)
    finally:
        await pub.stop()
        await sub.stop()


async def test_mutual_tls(tls_broker: Broker, unique_id: str, wire: str) -> None:
    topic = f"t/{unique_id}"
    sub, pub, inbox = await _pair(tls_broker, unique_id, topic)
    try:
        await asyncio.wait_for(await pub.publish(topic, b"x" * 300), 5)
        await inbox.wait_for(1)
    finally:
        await pub.stop()
        await sub.stop()


async def test_big_and_small_messages_cross_tls_records_intact(
    tls_broker: Broker, unique_id: str, wire: str
) -> None:
    """Frames larger than a TLS record and than one read, between bursts of small ones:
    the subscriber must pick up records already decrypted (SSLSocket.pending())."""
    topic = f"t/{unique_id}"
    sub, pub, inbox = await _pair(tls_broker, unique_id, topic, max_inflight=100)
    rng = random.Random(7)
    sizes = [rng.choice([1, 300, 20_000, 150_000]) for _ in range(200)]
    payloads = [rng.randbytes(n) for n in sizes]
    try:
        futures = [await pub.publish(topic, p) for p in payloads]
        await asyncio.wait_for(asyncio.gather(*futures), 20)
        await inbox.wait_for(len(payloads), timeout=20)
        assert [p for _, p in inbox.items] == payloads
    finally:
        await pub.stop()
        await sub.stop()


async def test_a_publish_the_broker_refuses_fails_its_future(
    mqtt_broker: Broker, unique_id: str, wire: str
) -> None:
    client = MqttClient(_options(mqtt_broker, unique_id))
    await client.start()
    await client.wait_connected(5)
    try:
        refused = await client.publish("$SYS/dgdm-test", b"x")  # mosquitto: not authorized
        with pytest.raises(TransportError, match="Not authorized"):
            await asyncio.wait_for(refused, 5)
        # No subscriber is a success (MQTT 5 reason 0x10), not a refusal.
        await asyncio.wait_for(await client.publish(f"nobody/{unique_id}", b"x"), 5)
        assert (client.acked, client.rejected, client.inflight) == (1, 1, 0)
    finally:
        await client.stop()


async def test_qos2_deliveries_are_left_to_paho_and_arrive(
    mqtt_broker: Broker, unique_id: str, wire: str
) -> None:
    """QoS 2 goes through paho's own handling (PUBREC/PUBREL/PUBCOMP) inside the wire."""
    topic = f"q2/{unique_id}"
    inbox = Inbox()
    sub = MqttClient(_options(mqtt_broker, f"{unique_id}-sub"), on_message=inbox)
    await sub.start()
    await sub.wait_connected(5)
    await sub.subscribe(topic, qos=2)
    await asyncio.sleep(0.1)
    endpoint = parse_broker_url(mqtt_broker.url)
    publisher = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    publisher.connect(endpoint.host, endpoint.port)
    publisher.loop_start()
    try:
        for i in range(20):
            info = publisher.publish(topic, b"%d" % i, qos=2)
            await asyncio.to_thread(info.wait_for_publish, 5)
        await inbox.wait_for(20)
        assert [p for _, p in inbox.items] == [b"%d" % i for i in range(20)]
    finally:
        publisher.disconnect()
        publisher.loop_stop()
        await sub.stop()


async def test_keepalive_pings_flow_while_only_publishes_are_acknowledged(
    mqtt_broker: Broker, unique_id: str, wire: str
) -> None:
    """The lean wire handles PUBACKs without paho, so paho pings; PINGRESP must come back
    through the wire or paho (and the broker, at 1.5 x keepalive) would drop the link."""
    client = MqttClient(_options(mqtt_broker, unique_id, keepalive_s=1))
    await client.start()
    await client.wait_connected(5)
    try:
        for _ in range(35):
            await client.send(f"ka/{unique_id}", b"x")
            await asyncio.sleep(0.1)
        assert client.connected
        assert (client.connects, client.disconnects) == (1, 0)
        assert client.acked == 35
    finally:
        await client.stop()


async def test_a_clean_stop_after_a_burst_sends_no_will(
    mqtt_broker: Broker, unique_id: str, wire: str
) -> None:
    """stop() lets the queued burst out first, then DISCONNECT: everything arrives and the
    broker does not publish the will."""
    topic = f"burst/{unique_id}"
    will_topic = f"will/{unique_id}"
    inbox = Inbox()
    watcher = MqttClient(
        _options(mqtt_broker, f"{unique_id}-w"),
        on_message=inbox,
        subscriptions=((topic, 1), (will_topic, 1)),
    )
    device = MqttClient(_options(mqtt_broker, unique_id, will=Will(will_topic, b"gone")))
    for client in (watcher, device):
        await client.start()
        await client.wait_connected(5)
    await asyncio.sleep(0.1)
    try:
        for _ in range(300):
            await device.publish(topic, b"y" * 20_000)
        await device.stop()
        await inbox.wait_for(300)
        await asyncio.sleep(0.5)
        assert [t for t, _ in inbox.items] == [topic] * 300
    finally:
        await watcher.stop()


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
    # A backoff cap of 1 s: a broker slow to come back (a loaded machine) must not push
    # the next attempt past wait_connected's 10 s (full jitter reaches 12.8 s by attempt 8).
    client = MqttClient(_options(fresh_broker, unique_id, keepalive_s=2, backoff_max_s=1.0))
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


async def test_paused_reading_delivers_nothing_until_resumed_and_loses_nothing(
    mqtt_broker: Broker, unique_id: str, wire: str
) -> None:
    topic = f"t/{unique_id}"
    sub, pub, inbox = await _pair(mqtt_broker, unique_id, topic)
    paused_at: list[int] = []

    def pause_midway(t: str, payload: bytes) -> None:
        inbox(t, payload)
        if len(inbox.items) == 10:  # a handler pauses in the middle of a burst of frames
            sub.pause_reading()
            paused_at.append(len(inbox.items))

    sub._on_message = pause_midway
    try:
        for i in range(500):
            await pub.send(topic, b"%04d" % i)
        await eventually(lambda: pub.inflight == 0, 5, "the PUBACKs")
        await asyncio.sleep(0.5)
        assert len(inbox.items) == 10  # nothing delivered while paused
        sub.resume_reading()
        await inbox.wait_for(500)
        assert [p for _, p in inbox.items] == [b"%04d" % i for i in range(500)]
        assert sub.connected
    finally:
        await pub.stop()
        await sub.stop()


async def test_retained_messages_go_to_on_retained_and_live_ones_to_on_message(
    mqtt_broker: Broker, unique_id: str, wire: str
) -> None:
    topic = f"t/{unique_id}/r"
    pub = MqttClient(_options(mqtt_broker, f"{unique_id}-pub"))
    await pub.start()
    await pub.wait_connected(5)
    await (await pub.publish(topic, b"before", retain=True))
    live, retained = Inbox(), Inbox()
    sub = MqttClient(
        _options(mqtt_broker, f"{unique_id}-sub"),
        on_message=live,
        on_retained=retained,
        subscriptions=((topic, 1),),
    )
    try:
        await sub.start()
        await retained.wait_for(1)
        await (await pub.publish(topic, b"after", retain=True))
        await live.wait_for(1)
        assert (retained.items, live.items) == ([(topic, b"before")], [(topic, b"after")])
    finally:
        await (await pub.publish(topic, b"", retain=True))
        await pub.stop()
        await sub.stop()


def test_the_wire_is_chosen_by_option_and_checked() -> None:
    assert MqttClient(MqttOptions("mqtt://127.0.0.1:1", "c", wire="paho")).active_wire == "paho"
    assert MqttClient(MqttOptions("mqtt://127.0.0.1:1", "c")).active_wire == "lean"
    with pytest.raises(ConfigError, match=r"sync\.wire"):
        MqttClient(MqttOptions("mqtt://127.0.0.1:1", "c", wire="fast"))  # type: ignore[arg-type]


async def test_a_broker_without_mqtt5_gets_an_error_naming_the_setting(
    tmp_path, unique_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    """amqtt (the demo extra) speaks 3.1.1 only; an MQTT 5 CONNECT gets no CONNACK."""
    pytest.importorskip("amqtt", reason="amqtt (the demo extra) is not installed")
    broker = Broker(tmp_path / "amqtt", engine="amqtt").start()
    try:
        client = MqttClient(
            MqttOptions(broker.url, unique_id, mqtt_version="5", connect_timeout_s=1.0)
        )
        await client.start()
        with pytest.raises(TransportError) as failed:
            await client.wait_connected(4)
        await client.stop()
        assert 'may not speak MQTT 5: set mqtt_version = "3.1.1"' in str(failed.value)
        assert "sync.mqtt_version" in caplog.text
        ok = MqttClient(MqttOptions(broker.url, f"{unique_id}-3", mqtt_version="3.1.1"))
        await ok.start()
        await ok.wait_connected(5)  # the setting it names does work
        await ok.stop()
    finally:
        broker.stop()


def test_the_wire_setting_reaches_the_client_from_agent_and_coordinator_config() -> None:
    from dgdm.agent.config import load_config as agent_config
    from dgdm.sync.coordinator.config import load_config as coordinator_config
    from dgdm.sync.mqtt import options_from_settings

    sync = agent_config(None, env={"DGDM__SYNC__WIRE": "paho"}).sync
    agent = options_from_settings(dataclasses.replace(sync, broker_url="mqtt://127.0.0.1:1"), "a")
    coordinator = options_from_settings(
        coordinator_config(None, env={"DGDM__MQTT__WIRE": "paho"}).mqtt, "c"
    )
    assert MqttClient(agent).active_wire == MqttClient(coordinator).active_wire == "paho"
    assert agent_config(None, env={}).sync.wire == "lean"
    with pytest.raises(ConfigError, match=r"sync\.wire"):
        agent_config(None, env={"DGDM__SYNC__WIRE": "fast"})
