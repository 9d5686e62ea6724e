"""The dgdm_broker role, run for real against localhost, configures a mosquitto that works.

The role renders into a temporary root (conftest `fleet`, which starts the system's
mosquitto with the rendered config on a free port). Checked over real TLS connections: only
clients with a certificate from the fleet CA get in, a device reads and writes its own
topics only, the coordinator sees them all, only the coordinator joins its shared
subscription, and a message the broker acknowledged survives a SIGKILL (autosave on changes).
"""

from __future__ import annotations

import contextlib
import datetime
import queue
import signal
import socket
import ssl
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .conftest import Fleet

NOT_AUTHORIZED = 135
NO_SUBSCRIBERS = 16

pytestmark = pytest.mark.slow


def client_cert(fleet: Fleet, name: str) -> tuple[Path, Path]:
    """A client certificate with CN `name`, signed by the fleet CA the role created."""
    ca_key = serialization.load_pem_private_key((fleet.pki / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((fleet.pki / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    key_path, cert_path = fleet.base / f"{name}.key", fleet.base / f"{name}.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


class Client:
    """A blocking MQTT 5 client over TLS, with received messages in a queue."""

    def __init__(self, host: Fleet, name: str, client_id: str | None = None) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.acks: queue.Queue[list[int]] = queue.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or name, protocol=mqtt.MQTTv5
        )
        certfile, keyfile = client_cert(host, name)
        self.client.tls_set(ca_certs=str(host.pki / "ca.pem"), certfile=certfile, keyfile=keyfile)
        self.client.on_message = lambda _c, _u, msg: self.messages.put((msg.topic, msg.payload))
        self.client.on_subscribe = lambda _c, _u, _mid, codes, _p: self.acks.put(
            [c.value for c in codes]
        )
        self.client.on_publish = lambda _c, _u, _mid, code, _p: self.acks.put([code.value])
        self.port = host.broker_port

    def connect(self, *, clean_start: bool = True, session_expiry_s: int = 3600) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry_s
        self.client.connect("127.0.0.1", self.port, clean_start=clean_start, properties=props)
        self.client.loop_start()

    def subscribe(self, topic: str) -> int:
        self.client.subscribe(topic, qos=1)
        return self.acks.get(timeout=5)[0]

    def publish(self, topic: str, payload: bytes) -> int:
        self.client.publish(topic, payload, qos=1)
        return self.acks.get(timeout=5)[0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_client_without_a_fleet_certificate_is_refused(fleet: Fleet) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _connect_without_a_certificate(fleet)


def _connect_without_a_certificate(fleet: Fleet) -> None:
    """An MQTT CONNECT over TLS without a client certificate, until CONNACK.

    A raw socket, closed whatever happens (a failed paho connect leaks its socket). TLS 1.3
    refuses a missing certificate late: at the first read.
    """
    context = ssl.create_default_context(cafile=str(fleet.pki / "ca.pem"))
    connect = b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04anon"
    with (
        socket.create_connection(("127.0.0.1", fleet.broker_port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(connect)
        if not tls.recv(4):
            raise ConnectionError("closed without CONNACK")


def test_a_device_uses_its_own_topics_only(fleet: Fleet) -> None:
    """Another device's traffic never reaches a device, and a device cannot forge it.

    The broker refuses the subscriptions themselves (dynamic security), and what gets
    delivered is asserted too.
    """
    coordinator = Client(fleet, "dgdm-coordinator")
    device = Client(fleet, "edge-acl-a")
    coordinator.connect()
    device.connect()
    try:
        assert coordinator.subscribe("dgdm/v1/+/result") == 1
        assert device.subscribe("dgdm/v1/edge-acl-a/cmd") == 1
        assert device.subscribe("dgdm/v1/edge-acl-b/cmd") == NOT_AUTHORIZED
        assert device.subscribe("dgdm/v1/+/result") == NOT_AUTHORIZED
        assert device.subscribe("dgdm/v1/edge-acl-a/result") == 1
        assert device.publish("dgdm/v1/edge-acl-b/result", b"forged") == NOT_AUTHORIZED
        # Nobody holds a subscription to another device's commands.
        assert coordinator.publish("dgdm/v1/edge-acl-b/cmd", b"not yours") == NO_SUBSCRIBERS
        assert coordinator.publish("dgdm/v1/edge-acl-b/result", b"other") == 0
        assert device.publish("dgdm/v1/edge-acl-a/result", b"mine") == 0
        assert coordinator.publish("dgdm/v1/edge-acl-a/cmd", b"do") == 0
        got = {coordinator.messages.get(timeout=5) for _ in range(2)}
        assert got == {
            ("dgdm/v1/edge-acl-b/result", b"other"),
            ("dgdm/v1/edge-acl-a/result", b"mine"),
        }
        # The device gets its own command and result; nothing of edge-acl-b's.
        got = {device.messages.get(timeout=5) for _ in range(2)}
        assert got == {("dgdm/v1/edge-acl-a/cmd", b"do"), ("dgdm/v1/edge-acl-a/result", b"mine")}
        time.sleep(0.5)
        assert device.messages.empty()
        assert coordinator.messages.empty()
    finally:
        coordinator.close()
        device.close()


SHARE = "$share/dgdm/dgdm/v1/+/result"


def test_only_the_coordinator_joins_its_shared_subscription(fleet: Fleet) -> None:
    """Hostile devices in the coordinator's share group would each take a share and drop it.

    mosquitto with an ACL file grants any `$share/...` subscription and then refuses to
    deliver to the device by ACL: the message is gone for the coordinator too. The role's
    dynamic-security configuration refuses the subscription itself.
    """
    _forget_the_deployed_coordinators_session(fleet)
    coordinator = Client(fleet, "dgdm-coordinator")
    hostile = [Client(fleet, f"edge-share-{i}") for i in range(4)]
    device = Client(fleet, "edge-share-src")
    clients = [coordinator, device, *hostile]
    for client in clients:
        client.connect()
    try:
        assert coordinator.subscribe(SHARE) == 1
        hostile_codes = [h.subscribe(SHARE) for h in hostile]
        # Another group of its own, or the device's own topics shared: refused just the same.
        hostile_codes.append(hostile[0].subscribe("$share/other/dgdm/v1/+/result"))
        hostile_codes.append(hostile[1].subscribe("$share/dgdm/dgdm/v1/edge-share-1/result"))
        for i in range(20):
            assert device.publish("dgdm/v1/edge-share-src/result", b"%d" % i) == 0
        got = []
        with contextlib.suppress(queue.Empty):
            while len(got) < 20:
                got.append(coordinator.messages.get(timeout=3))
        assert sorted(int(payload) for _, payload in got) == list(range(20)), len(got)
        assert hostile_codes == [NOT_AUTHORIZED] * 6
        assert all(h.messages.empty() for h in hostile)
    finally:
        for client in clients:
            client.close()


def _forget_the_deployed_coordinators_session(fleet: Fleet) -> None:
    """Drop the session a deployed coordinator run by an earlier test left on this broker.

    Its session (`mqtt.session_expiry_s`, 60 s, by design: a restart resumes its share)
    keeps its seat in `$share/dgdm`, and the broker queues every other message for it: this
    test's coordinator would get half. A clean start under its client id with no expiry
    ends that session; nothing else here has one.
    """
    stale = Client(fleet, "dgdm-coordinator", client_id="dgdm-coordinator-coordinator")
    stale.connect(clean_start=True, session_expiry_s=0)
    stale.close()


def test_an_identity_the_broker_does_not_list_gets_no_topic(fleet: Fleet) -> None:
    """A certificate from the fleet CA alone is not enough: dgdm_broker_devices lists ids."""
    stranger = Client(fleet, "edge-unlisted")
    stranger.connect()
    try:
        assert stranger.subscribe("dgdm/v1/edge-unlisted/cmd") == NOT_AUTHORIZED
        assert stranger.publish("dgdm/v1/edge-unlisted/result", b"x") == NOT_AUTHORIZED
    finally:
        stranger.close()


def test_devices_read_coordinator_presence_and_cannot_write_it(fleet: Fleet) -> None:
    """dgdm/coordinators/<id>: the coordinator writes it (retained), devices only read it.

    Other retained presence messages (of coordinators that ran earlier) may be there too.
    """
    coordinator = Client(fleet, "dgdm-coordinator")
    device = Client(fleet, "edge-presence")
    coordinator.connect()
    device.connect()
    mine = ("dgdm/coordinators/test-presence", b"online")
    try:
        assert coordinator.subscribe("dgdm/coordinators/#") == 1
        coordinator.client.publish(mine[0], mine[1], qos=1, retain=True)
        assert coordinator.acks.get(timeout=5) == [0]
        assert mine in drain(coordinator.messages)
        # Retained: a device subscribing later gets it.
        assert device.subscribe("dgdm/coordinators/+") == 1
        assert mine in drain(device.messages)
        # Nothing more: not the whole subtree, not writing there.
        assert device.subscribe("dgdm/coordinators/#") == NOT_AUTHORIZED
        assert device.publish(mine[0], b"forged") == NOT_AUTHORIZED
        assert device.publish("dgdm/coordinators/edge-presence", b"forged") == NOT_AUTHORIZED
        assert drain(coordinator.messages) == []
        assert drain(device.messages) == []
    finally:
        coordinator.client.publish(mine[0], b"", qos=1, retain=True)
        coordinator.close()
        device.close()


def drain(messages: queue.Queue[tuple[str, bytes]], quiet: float = 0.5) -> list[tuple[str, bytes]]:
    """Every message that arrives until none has for `quiet` seconds."""
    got = []
    with contextlib.suppress(queue.Empty):
        while True:
            got.append(messages.get(timeout=quiet))
    return got


def test_an_acknowledged_message_survives_sigkill(fleet: Fleet) -> None:
    device = Client(fleet, "edge-persist")
    device.connect(clean_start=False)
    assert device.subscribe("dgdm/v1/edge-persist/cmd") == 1
    device.close()
    coordinator = Client(fleet, "dgdm-coordinator")
    coordinator.connect()
    assert coordinator.publish("dgdm/v1/edge-persist/cmd", b"queued") == 0
    coordinator.close()
    time.sleep(1.5)  # autosave_interval 1: the change is on disk within a second
    fleet.stop_broker(signal.SIGKILL)
    fleet.start_broker()
    device = Client(fleet, "edge-persist")
    device.connect(clean_start=False)
    try:
        assert device.messages.get(timeout=5) == ("dgdm/v1/edge-persist/cmd", b"queued")
    finally:
        device.close()
