"""Certificate renewal and device revocation by the roles, run for real (conftest `fleet`).

Renewal: a certificate expiring within dgdm_cert_renew_days is signed again on the next run
(the broker's and a device's), a fresh one is left alone, and the handlers that apply it are
notified. Revocation: every certificate issued to a device in dgdm_revoked_devices goes on
the CRL, and mosquitto, restarted with the rendered config, refuses that device over TLS
while other devices still connect. The CA's own end: nothing it signs outlives it, a CA
that expires within the renewal window stops the play, and after the rotation the README
describes every certificate is signed again. A box whose device id changes gets a new key
and a certificate for the new id. A box cannot get a certificate for another identity: the
controller checks the request and signs the subject the inventory names.
"""

from __future__ import annotations

import datetime
import queue
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from .conftest import DEVICE_ID, Fleet, changed_tasks, handlers_run, recap

pytestmark = pytest.mark.slow

CONNACK_ACCEPTED = b"\x20\x02\x00\x00"
ISSUE_CLIENT_CERTS = Path(__file__).with_name("issue_client_certs.yml")


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def days_left(cert: x509.Certificate) -> float:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (cert.not_valid_after_utc - now).total_seconds() / 86400


def mqtt_connect(fleet: Fleet, cert: Path, key: Path, client_id: str) -> bytes:
    """An MQTT 3.1.1 CONNECT over mutual TLS to the fleet's broker; the first bytes back.

    A refused client certificate raises ssl.SSLError: in the handshake under TLS 1.2, at the
    first read under TLS 1.3 (the server checks the certificate after the client finished).
    mosquitto 2.0 closes without a TLS alert, so the error says EOF, not why.
    """
    context = ssl.create_default_context(cafile=str(fleet.pki / "ca.pem"))
    context.load_cert_chain(cert, key)
    ident = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack("!H", len(ident)) + ident
    with (
        socket.create_connection(("127.0.0.1", fleet.broker_port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(bytes([0x10, len(body)]) + body)
        return tls.recv(4)


def server_cert(fleet: Fleet) -> x509.Certificate:
    """The certificate the running broker presents."""
    context = ssl.create_default_context(cafile=str(fleet.pki / "ca.pem"))
    with (
        socket.create_connection(("127.0.0.1", fleet.broker_port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def presented_serial(fleet: Fleet, expected: int, timeout: float = 5) -> int:
    """The serial the broker presents, once it is `expected` (mosquitto reloads in its loop)."""
    deadline = time.monotonic() + timeout
    while (serial := server_cert(fleet).serial_number) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return serial


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


@pytest.mark.timeout(600)
@pytest.mark.deploy_full
def test_a_certificate_expiring_soon_is_renewed_and_a_fresh_one_is_not(fleet: Fleet) -> None:
    agent = fleet.pki / "clients" / f"{DEVICE_ID}.pem"
    broker = fleet.pki / "certs" / "broker-localhost.pem"
    coordinator = fleet.pki / "clients" / "dgdm-coordinator.pem"
    coordinator_before = coordinator.read_bytes()
    # Short-lived certificates: without the controller's copies the next run signs new ones,
    # here for 2 days, which a 1-day renewal window leaves alone.
    agent.unlink()
    broker.unlink()
    short_lived = {"dgdm_agent_cert_days": 2, "dgdm_broker_cert_days": 2, "dgdm_cert_renew_days": 1}
    assert_ok(fleet.play(groups=("dgdm_broker", "dgdm_agents"), **short_lived))
    short = {"agent": load_cert(agent), "broker": load_cert(broker)}
    assert all(1.9 < days_left(cert) <= 2 for cert in short.values())

    renewal = fleet.play()  # the default 30-day window

    assert_ok(renewal)
    # Nothing else changes: not the coordinator's certificate, no other task.
    assert changed_tasks(renewal) == [
        "dgdm_broker : Sign the broker's certificate with the fleet CA",
        "dgdm_broker : Install the server certificate",
        "dgdm_tls_client : Sign the request with the fleet CA",
        "dgdm_tls_client : Install the client certificate and the CA",
    ], renewal.stdout[-6000:]
    assert handlers_run(renewal) == [
        "dgdm_broker : Reload mosquitto",
        "dgdm_agent : Restart dgdm-agent",
    ]
    renewed = {"agent": load_cert(agent), "broker": load_cert(broker)}
    for name, cert in renewed.items():
        assert cert.serial_number != short[name].serial_number, name
        assert 824 < days_left(cert) <= 825, name
    assert coordinator.read_bytes() == coordinator_before
    installed = fleet.path("/etc/dgdm/tls/client.pem")
    assert load_cert(installed).serial_number == renewed["agent"].serial_number
    assert (
        load_cert(fleet.path("/etc/mosquitto/dgdm/server.pem")).serial_number
        == renewed["broker"].serial_number
    )
    # What the reload handler does (ExecReload= sends SIGHUP): mosquitto presents the new
    # certificate, and the device connects with its renewed one.
    assert fleet.broker is not None
    fleet.broker.send_signal(signal.SIGHUP)
    new_serial = renewed["broker"].serial_number
    assert presented_serial(fleet, new_serial) == new_serial
    key = fleet.path("/etc/dgdm/tls/client.key")
    assert mqtt_connect(fleet, installed, key, DEVICE_ID) == CONNACK_ACCEPTED


def test_a_revoked_device_is_refused_and_the_others_still_connect(fleet: Fleet) -> None:
    devices = ["edge-lost", "edge-kept"]
    assert_ok(fleet.play(ISSUE_CLIENT_CERTS, ("dgdm_broker",), dgdm_test_devices=devices))
    # A second certificate for the lost box (as after a renewal): both must be refused.
    first = fleet.base / "edge-lost-first.pem"
    shutil.move(fleet.pki / "clients" / "edge-lost.pem", first)
    assert_ok(fleet.play(ISSUE_CLIENT_CERTS, ("dgdm_broker",), dgdm_test_devices=["edge-lost"]))
    box = {d: fleet.prefix / "boxes" / d / "etc/dgdm/tls" for d in devices}
    lost_certs = [first, box["edge-lost"] / "client.pem"]
    for cert in lost_certs:
        assert mqtt_connect(fleet, cert, box["edge-lost"] / "client.key", "edge-lost") == (
            CONNACK_ACCEPTED
        )

    revoked = fleet.play(groups=("dgdm_broker",), dgdm_revoked_devices=["edge-lost"])

    assert_ok(revoked)
    assert changed_tasks(revoked) == [
        "dgdm_broker : Revoke the certificates issued to revoked devices",
        "dgdm_broker : Sign the CRL with the fleet CA",
        "dgdm_broker : Install the CRL",
    ], revoked.stdout[-6000:]
    assert handlers_run(revoked) == ["dgdm_broker : Restart mosquitto"]
    crl = x509.load_pem_x509_crl(fleet.path("/etc/mosquitto/dgdm/crl.pem").read_bytes())
    assert {entry.serial_number for entry in crl} == {
        load_cert(cert).serial_number for cert in lost_certs
    }
    fleet.stop_broker()  # what the handler does
    log = fleet.base / "mosquitto.log"
    seen = log.stat().st_size
    fleet.start_broker()
    kept = box["edge-kept"]
    assert mqtt_connect(fleet, kept / "client.pem", kept / "client.key", "edge-kept") == (
        CONNACK_ACCEPTED
    )
    agent = fleet.path("/etc/dgdm/tls")
    assert mqtt_connect(fleet, agent / "client.pem", agent / "client.key", DEVICE_ID) == (
        CONNACK_ACCEPTED
    )
    for cert in lost_certs:
        with pytest.raises(ssl.SSLError):
            mqtt_connect(fleet, cert, box["edge-lost"] / "client.key", "edge-lost")
    fleet.stop_broker()  # flushes its log
    refused = log.read_bytes()[seen:].decode()
    assert refused.count("certificate verify failed") == len(lost_certs), refused
    fleet.start_broker()

    again = fleet.play(groups=("dgdm_broker",), dgdm_revoked_devices=["edge-lost"])
    assert_ok(again)
    assert recap(again)["changed"] == 0, changed_tasks(again)


def test_the_agent_role_refuses_a_revoked_device(fleet: Fleet) -> None:
    result = fleet.play(groups=("dgdm_agents",), dgdm_revoked_devices=[DEVICE_ID])
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-6000:]
    assert f"{DEVICE_ID} is in dgdm_revoked_devices" in output
    assert recap(result)["changed"] == 0


CA_EXPIRES = "expires on"
ROTATE_CA = "Rotate the CA: move ca.key, ca.pem, index.txt*, crlnumber*, crl.pem and newcerts/"
# What the README's rotation moves out of the PKI directory (CA_EXPIRES's message too).
CA_FILES = ("ca.key", "ca.pem", "index.txt*", "crlnumber*", "crl.pem", "newcerts")


def common_name(cert: x509.Certificate) -> str:
    (attribute,) = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attribute.value)


class OtherFleet:
    """A PKI directory and a root prefix of its own, so that the session's fleet is untouched."""

    def __init__(self, fleet: Fleet, name: str) -> None:
        self.fleet = fleet
        self.pki = fleet.base / name / "pki"
        self.prefix = fleet.base / name / "root"

    def play(
        self,
        playbook: str | Path = "site.yml",
        groups: tuple[str, ...] = ("dgdm_broker",),
        **v: object,
    ) -> subprocess.CompletedProcess[str]:
        return self.fleet.play(
            playbook, groups, dgdm_pki_dir=str(self.pki), dgdm_prefix=str(self.prefix), **v
        )

    def issue(self, *devices: str, **v: object) -> subprocess.CompletedProcess[str]:
        """Client certificates from the dgdm_tls_client role alone (no broker role in the run)."""
        return self.play(ISSUE_CLIENT_CERTS, dgdm_test_devices=list(devices), **v)

    def box_cert(self, device: str) -> x509.Certificate:
        return load_cert(self.prefix / "boxes" / device / "etc/dgdm/tls/client.pem")


@pytest.fixture(scope="module")
def short_ca(fleet: Fleet) -> OtherFleet:
    """A fleet whose CA lasts 60 days: the broker's certificate, its CRL and a device's."""
    other = OtherFleet(fleet, "short-ca")
    assert_ok(other.play(dgdm_ca_days=60))
    assert_ok(other.issue("edge-capped"))
    return other


@pytest.mark.deploy_full
def test_nothing_the_ca_signs_outlives_it(short_ca: OtherFleet) -> None:
    ca = load_cert(short_ca.pki / "ca.pem")
    assert 59.9 < days_left(ca) <= 60
    # 825 days asked for, cut to the CA's end.
    for cert in (
        short_ca.pki / "certs/broker-localhost.pem",
        short_ca.pki / "clients/edge-capped.pem",
    ):
        assert load_cert(cert).not_valid_after_utc == ca.not_valid_after_utc, cert
    assert short_ca.box_cert("edge-capped").not_valid_after_utc == ca.not_valid_after_utc
    crl = x509.load_pem_x509_crl((short_ca.pki / "crl.pem").read_bytes())
    assert crl.next_update_utc is not None
    until_ca_end = ca.not_valid_after_utc - crl.next_update_utc
    assert datetime.timedelta(0) <= until_ca_end < datetime.timedelta(hours=1)


def test_a_ca_expiring_within_the_renewal_window_stops_the_play(fleet: Fleet) -> None:
    other = OtherFleet(fleet, "expiring-ca")

    broker = other.play(dgdm_ca_days=20)  # within the default 30-day window

    output = broker.stdout + broker.stderr
    assert broker.returncode != 0, output[-6000:]
    assert f"The fleet CA {other.pki}/ca.pem {CA_EXPIRES}" in output, output[-6000:]
    assert "within dgdm_cert_renew_days (30 days)" in output
    assert ROTATE_CA in output
    # Stopped before it signed anything or touched the box.
    assert not (other.pki / "certs").exists()
    assert not other.prefix.exists()
    # The dgdm_tls_client role refuses too, where the broker role did not run first.
    device = other.issue("edge-late")
    output = device.stdout + device.stderr
    assert device.returncode != 0, output[-6000:]
    assert ROTATE_CA in output
    assert not (other.pki / "clients" / "edge-late.pem").exists()
    assert not other.prefix.exists()


@pytest.mark.deploy_full
def test_after_a_ca_rotation_every_certificate_is_signed_again(short_ca: OtherFleet) -> None:
    """The README's rotation: move the CA's files aside, run the playbook."""
    old_ca = load_cert(short_ca.pki / "ca.pem")
    retired = short_ca.pki / "retired-ca"
    retired.mkdir()
    for pattern in CA_FILES:
        for path in short_ca.pki.glob(pattern):
            shutil.move(path, retired)

    assert_ok(short_ca.play())
    assert_ok(short_ca.issue("edge-capped"))

    ca = load_cert(short_ca.pki / "ca.pem")
    assert ca.public_key() != old_ca.public_key()
    assert 3649 < days_left(ca) <= 3650
    installed = {
        "broker": load_cert(short_ca.prefix / "etc/mosquitto/dgdm/server.pem"),
        "device": short_ca.box_cert("edge-capped"),
    }
    for name, cert in installed.items():
        cert.verify_directly_issued_by(ca)
        assert 824 < days_left(cert) <= 825, name
    for ca_copy in ("etc/mosquitto/dgdm/ca.pem", "boxes/edge-capped/etc/dgdm/tls/ca.pem"):
        assert load_cert(short_ca.prefix / ca_copy) == ca, ca_copy
    crl = x509.load_pem_x509_crl((short_ca.prefix / "etc/mosquitto/dgdm/crl.pem").read_bytes())
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]


def spki(cert_or_key_file: x509.Certificate | Path) -> bytes:
    """The public key of a certificate, or of a private key file, as PEM."""
    if isinstance(cert_or_key_file, x509.Certificate):
        public = cert_or_key_file.public_key()
    else:
        public = serialization.load_pem_private_key(
            cert_or_key_file.read_bytes(), None
        ).public_key()
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def delivered_to_itself(fleet: Fleet, tls_dir: Path, topics: list[str]) -> list[str]:
    """Topics of the fleet broker's messages a device gets back after publishing to `topics`.

    The device subscribes to each topic; the broker grants its own subtree only. The last
    topic must be allowed: once it arrives, anything the broker let through came before.
    """
    received: queue.Queue[str] = queue.Queue()
    subscribed = threading.Semaphore(0)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="renamed", protocol=mqtt.MQTTv5)
    client.tls_set(
        ca_certs=str(tls_dir / "ca.pem"),
        certfile=str(tls_dir / "client.pem"),
        keyfile=str(tls_dir / "client.key"),
    )
    client.on_message = lambda _c, _u, msg: received.put(msg.topic)
    client.on_subscribe = lambda *_: subscribed.release()
    client.connect("127.0.0.1", fleet.broker_port)
    client.loop_start()
    try:
        for topic in topics:
            client.subscribe(topic, qos=1)
            assert subscribed.acquire(timeout=5)
        for topic in topics:
            client.publish(topic, b"x", qos=1).wait_for_publish(timeout=5)
        got = [received.get(timeout=5)]
        while got[-1] != topics[-1]:
            got.append(received.get(timeout=5))
        return got
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.timeout(600)
@pytest.mark.deploy_full
def test_a_new_device_id_gets_a_new_key_and_a_certificate_for_it(fleet: Fleet) -> None:
    """The agent role on a box of its own; then the inventory gives it another device id."""
    prefix = fleet.base / "renamed-box"
    tls_dir = prefix / "etc/dgdm/tls"
    assert_ok(
        fleet.play(
            groups=("dgdm_agents",), dgdm_prefix=str(prefix), dgdm_agent_device_id="edge-old"
        )
    )
    old_key = spki(tls_dir / "client.key")
    assert common_name(load_cert(tls_dir / "client.pem")) == "edge-old"

    renamed = fleet.play(
        groups=("dgdm_agents",), dgdm_prefix=str(prefix), dgdm_agent_device_id="edge-new"
    )

    assert_ok(renamed)
    cert = load_cert(tls_dir / "client.pem")
    assert common_name(cert) == "edge-new"
    assert common_name(load_cert(fleet.pki / "clients" / "edge-new.pem")) == "edge-new"
    assert spki(tls_dir / "client.key") == spki(cert) != old_key
    assert "dgdm_agent : Restart dgdm-agent" in handlers_run(renamed)
    # The broker's ACL (dgdm/v1/%u/#) now keys off the new id: the old id's topics are closed.
    assert delivered_to_itself(
        fleet, tls_dir, ["dgdm/v1/edge-old/result", "dgdm/v1/edge-new/result"]
    ) == ["dgdm/v1/edge-new/result"]


@pytest.mark.deploy_full
def test_a_renamed_broker_gets_a_new_key_and_a_certificate_for_its_name(fleet: Fleet) -> None:
    other = OtherFleet(fleet, "renamed-broker")
    assert_ok(other.play())
    server = other.prefix / "etc/mosquitto/dgdm"
    old_key = spki(server / "server.key")

    renamed = other.play(dgdm_broker_server_name="mqtt.renamed.test")

    assert_ok(renamed)
    cert = load_cert(server / "server.pem")
    assert common_name(cert) == "mqtt.renamed.test"
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["mqtt.renamed.test"]
    assert spki(server / "server.key") == spki(cert) != old_key
    assert handlers_run(renamed) == ["dgdm_broker : Reload mosquitto"]


# A compromised box: its openssl reports that the request on the box is for the box's own id
# (so the role's check on the box passes), whatever name the request really carries.
LYING_OPENSSL = """#!/bin/sh
case "$*" in
  *"req -noout -subject"*"/boxes/edge-forger/"*) echo "subject=CN=edge-forger"; exit 0 ;;
esac
exec /usr/bin/openssl "$@"
"""


def index_lines(fleet: Fleet) -> list[str]:
    return (fleet.pki / "index.txt").read_text().splitlines()


@pytest.mark.parametrize("claimed", ["dgdm-coordinator", DEVICE_ID])
def test_a_request_for_another_identity_is_refused(fleet: Fleet, claimed: str) -> None:
    """A box whose request names the coordinator or another device gets no certificate."""
    box = fleet.prefix / "boxes" / "edge-forger" / "etc/dgdm/tls"
    box.mkdir(parents=True, exist_ok=True)
    key, csr = box / "client.key", box / "client.csr"
    if not key.exists():
        subprocess.run(
            ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", str(key)],
            check=True,
        )  # fmt: skip
    subprocess.run(
        ["openssl", "req", "-new", "-subj", f"/CN={claimed}", "-key", str(key), "-out", str(csr)],
        check=True,
    )
    tools = fleet.base / "lying-box-bin"
    tools.mkdir(exist_ok=True)
    (tools / "openssl").write_text(LYING_OPENSSL)
    (tools / "openssl").chmod(0o755)
    before = index_lines(fleet)

    result = fleet.play(
        ISSUE_CLIENT_CERTS, ("dgdm_broker",), path_first=tools, dgdm_test_devices=["edge-forger"]
    )

    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-6000:]
    assert f"names CN={claimed}, not edge-forger" in output, output[-6000:]
    assert index_lines(fleet) == before
    assert not (fleet.pki / "clients" / "edge-forger.pem").exists()
    assert not (box / "client.pem").exists()
