"""Start and stop a private MQTT broker for tests, benchmarks and the demo.

The system's mosquitto runs on a free loopback port with its own config, data directory
and log under `work_dir` (never the system broker on 1883), optionally with TLS from
certificates generated here (`make_tls_files`), password auth or required client
certificates. When mosquitto is not installed, amqtt (MQTT 3.1.1 only) is the fallback.
Brokers are stopped by pid. Persistence is on (saved at a clean stop); `save_on_change`
also saves after every change, so that a broker killed with SIGKILL keeps the sessions
and queued messages it acknowledged (KERNELS-FACTS) — at ~1 ms per message, which caps
throughput near 800 msg/s, so it is off unless a test kills the broker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dgdm.sync.child_procs import wait_or_kill
from dgdm.sync.errors import SyncError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

_READY_TIMEOUT_S = 10.0


class BrokerError(SyncError):
    """The broker could not be started."""


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """PEM files of a throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""

    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None,
    )


class Broker:
    """A running private broker. `url` is what clients put in `sync.broker_url`."""

    def __init__(
        self,
        work_dir: Path,
        *,
        tls: bool = False,
        require_client_cert: bool = False,
        credentials: tuple[str, str] | None = None,
        port: int | None = None,
        engine: str = "auto",
        max_queued_messages: int = 1_000_000,
        max_inflight_messages: int = 0,
        save_on_change: bool = False,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.work_dir / "data"
        self.data_dir.mkdir(exist_ok=True)
        self.log_file = self.work_dir / "broker.log"
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.credentials = credentials
        self.require_client_cert = require_client_cert
        self.max_queued_messages = max_queued_messages
        self.max_inflight_messages = max_inflight_messages
        self.save_on_change = save_on_change
        self.engine = _pick_engine(engine, tls, credentials)
        self.tls = make_tls_files(self.work_dir / "tls") if tls else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def mqtt_version(self) -> str:
        """The newest protocol the broker speaks: amqtt has no MQTT 5."""
        return "5" if self.engine == "mosquitto" else "3.1.1"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> Broker:
        argv = self._mosquitto_argv() if self.engine == "mosquitto" else self._amqtt_argv()
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()
        return self

    def stop(self) -> None:
        """Stop gracefully (the broker saves its database), SIGKILL if it hangs."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: the broker loses whatever it had not saved yet."""
        self._signal(signal.SIGKILL)

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(sig)
        wait_or_kill(proc, 5)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                self.proc = None
                raise BrokerError(f"{self.engine} exited at start-up: {self._log_tail()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), 0.2),
            ):
                return
            time.sleep(0.02)
        self.kill()
        raise BrokerError(f"{self.engine} did not listen on {self.port}: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-600:].strip()
        except OSError:
            return "(no log)"

    def _mosquitto_argv(self) -> list[str]:
        conf = self.work_dir / "mosquitto.conf"
        conf.write_text(self._mosquitto_conf())
        exe = mosquitto_path()
        assert exe is not None
        return [exe, "-c", str(conf)]

    def _mosquitto_conf(self) -> str:
        lines = [
            f"listener {self.port} {self.host}",
            "persistence true",
            f"persistence_location {self.data_dir}/",
            f"max_queued_messages {self.max_queued_messages}",
            # Also the Receive Maximum mosquitto announces to MQTT 5 clients; 0 = no limit
            # (65535), so the clients' own windows decide (mosquitto's default is 20).
            f"max_inflight_messages {self.max_inflight_messages}",
            "log_dest stdout",
            "log_type error",
            "log_type warning",
        ]
        if self.save_on_change:
            # A SIGKILLed broker otherwise forgets what it PUBACKed; costs ~1 ms per message.
            lines += ["autosave_interval 1", "autosave_on_changes true"]
        if os.geteuid() == 0:
            # As root mosquitto would switch to user `mosquitto`, who cannot read our files.
            lines.append("user root")
        lines += self._auth_lines()
        lines += self._tls_lines()
        return "\n".join(lines) + "\n"

    def _auth_lines(self) -> list[str]:
        if self.credentials is None:
            return ["allow_anonymous true"]
        pwfile = self.work_dir / "passwd"
        pwfile.write_text("")
        user, password = self.credentials
        subprocess.run(
            ["mosquitto_passwd", "-b", str(pwfile), user, password],
            check=True,
            capture_output=True,
        )
        return ["allow_anonymous false", f"password_file {pwfile}"]

    def _tls_lines(self) -> list[str]:
        if self.tls is None:
            return []
        lines = [
            f"cafile {self.tls.ca_file}",
            f"certfile {self.tls.server_cert}",
            f"keyfile {self.tls.server_key}",
        ]
        if self.require_client_cert:
            lines.append("require_certificate true")
        return lines

    def _amqtt_argv(self) -> list[str]:
        conf = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        path = self.work_dir / "amqtt.yaml"
        path.write_text(json.dumps(conf))  # JSON is valid YAML
        code = "from amqtt.scripts.broker_script import main; main()"
        return [sys.executable, "-c", code, "-c", str(path)]


def _pick_engine(engine: str, tls: bool, credentials: tuple[str, str] | None) -> str:
    if engine == "auto":
        engine = "mosquitto" if mosquitto_path() else "amqtt"
    if engine not in ("mosquitto", "amqtt"):
        raise BrokerError(f"unknown broker engine {engine!r}")
    if engine == "mosquitto" and not mosquitto_path():
        raise BrokerError("mosquitto is not installed")
    if engine == "amqtt" and (tls or credentials):
        raise BrokerError("the amqtt fallback runs without TLS or passwords; install mosquitto")
    return engine


def start_broker(work_dir: Path, **options: object) -> Broker:
    """Create and start a `Broker` (see its constructor for the options)."""
    return Broker(work_dir, **options).start()  # type: ignore[arg-type]


def make_tls_files(out_dir: Path, host: str = "127.0.0.1") -> TlsFiles:
    """A CA, a server certificate (SAN `host`) and a client certificate, as PEM files."""
    from cryptography.hazmat.primitives.asymmetric import ec

    out_dir.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("dgdm test CA", ca_key, ca_key, None, is_ca=True, san=None)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _certificate(host, server_key, ca_key, ca_cert, is_ca=False, san=host)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = _certificate("dgdm-client", client_key, ca_key, ca_cert, is_ca=False, san=None)
    files = TlsFiles(
        ca_file=out_dir / "ca.pem",
        server_cert=out_dir / "server.pem",
        server_key=out_dir / "server.key",
        client_cert=out_dir / "client.pem",
        client_key=out_dir / "client.key",
    )
    _write_pem(files.ca_file, ca_cert)
    _write_pem(files.server_cert, server_cert)
    _write_pem(files.client_cert, client_cert)
    _write_key(files.server_key, server_key)
    _write_key(files.client_key, client_key)
    return files


def _certificate(
    common_name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer_cert: x509.Certificate | None,
    *,
    is_ca: bool,
    san: str | None,
) -> x509.Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if san is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(san))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write_pem(path: Path, cert: x509.Certificate) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
