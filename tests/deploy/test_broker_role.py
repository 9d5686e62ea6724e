"""The dgdm_broker role, run for real against localhost, configures a mosquitto that works.

The role renders into a temporary root (conftest `fleet`, which starts the system's
mosquitto with the rendered config on a free port). Checked over real TLS connections: only
clients with a certificate from the fleet CA get in, a device reads and writes its own
topics only, the coordinator sees them all, and a message the broker acknowledged survives
a SIGKILL (autosave on changes).
"""

from __future__ import annotations

import datetime
import queue
import signal
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

    def __init__(self, host: Fleet, name: str, *, cert: bool = True) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.acks: queue.Queue[list[int]] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        certfile, keyfile = client_cert(host, name) if cert else (None, None)
        self.client.tls_set(ca_certs=str(host.pki / "ca.pem"), certfile=certfile, keyfile=keyfile)
        self.client.on_message = lambda _c, _u, msg: self.messages.put((msg.topic, msg.payload))
        self.client.on_subscribe = lambda _c, _u, _mid, codes, _p: self.acks.put(
            [c.value for c in codes]
        )
        self.client.on_publish = lambda _c, _u, _mid, code, _p: self.acks.put([code.value])
        self.port = host.broker_port

    def connect(self, *, clean_start: bool = True) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
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
    client = Client(fleet, "intruder", cert=False)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _connect_and_wait(client.client, fleet.broker_port)


def _connect_and_wait(client: mqtt.Client, port: int) -> None:
    """Connect and run the loop until CONNACK; TLS 1.3 refuses a missing certificate late."""
    client.connect("127.0.0.1", port)
    for _ in range(50):
        client.loop(timeout=0.1)
        if client.is_connected():
            return
    raise ConnectionError("no CONNACK")


def test_a_device_uses_its_own_topics_only(fleet: Fleet) -> None:
    """Another device's traffic never reaches a device, and a device cannot forge it.

    Mosquitto 2.0 may grant a subscription the ACL forbids (it checks read access per
    message), so what is asserted is what gets delivered.
    """
    coordinator = Client(fleet, "dgdm-coordinator")
    device = Client(fleet, "edge-acl-a")
    coordinator.connect()
    device.connect()
    try:
        assert coordinator.subscribe("dgdm/v1/+/result") == 1
        assert device.subscribe("dgdm/v1/edge-acl-a/cmd") == 1
        device.subscribe("dgdm/v1/edge-acl-b/cmd")
        device.subscribe("dgdm/v1/+/result")
        assert device.publish("dgdm/v1/edge-acl-b/result", b"forged") in (0, NOT_AUTHORIZED)
        assert coordinator.publish("dgdm/v1/edge-acl-b/cmd", b"not yours") == 0
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
