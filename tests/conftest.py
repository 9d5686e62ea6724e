"""Shared fixtures: private MQTT brokers on free loopback ports (never the system's 1883).

- `mqtt_broker` (session): plain mosquitto, MQTT 5 and 3.1.1, anonymous; `broker.url`.
- `tls_broker` (session): mosquitto with TLS and required client certificates (mutual TLS);
  `broker.tls` holds `ca_file`, `client_cert`, `client_key`.
- `fresh_broker` (function): a broker of its own, for tests that `kill()` (SIGKILL),
  `stop()` and `start()` it again; it saves on every change (`save_on_change`) and its data
  directory survives restarts, so persistent sessions and queued messages survive a SIGKILL
  (slow: ~800 msg/s; the session brokers are fast and save only at a clean stop).

Each broker has its own config, data dir and log under a pytest tmp dir and is stopped by
pid at the end. Session brokers are shared: use unique device and client ids per test
(e.g. `unique_id`).
"""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dgdm.sync.broker import Broker

# The private PostgreSQL cluster fixtures (pg_cluster, pg_database, fresh_pg).
pytest_plugins = ["tests.pg", "tests.loop_guard"]

_ids = itertools.count(1)


@pytest.fixture(scope="session")
def mqtt_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    broker = Broker(tmp_path_factory.mktemp("mosquitto")).start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    broker = Broker(tmp_path_factory.mktemp("mosquitto-tls"), tls=True, require_client_cert=True)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def fresh_broker(tmp_path: Path) -> Iterator[Broker]:
    broker = Broker(tmp_path / "broker", save_on_change=True).start()
    yield broker
    broker.stop()


@pytest.fixture
def unique_id(request: pytest.FixtureRequest) -> str:
    """A device/client id unique within the session (valid per SPEC §5)."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
    return f"t{next(_ids)}-{name}".strip("-")


@pytest.fixture
def mount_tmpfs() -> Iterator[Callable[[Path, str], Path]]:
    """Mounts real small file systems (for full-disk tests): `mount_tmpfs(dir, "8m")`.
    Skips the test when mounting is not permitted (needs root); unmounts at teardown, after
    any fixture requested later (an agent process, say) has stopped."""
    mounted: list[Path] = []

    def mount(mount_point: Path, size: str) -> Path:
        mount_point.mkdir()
        options = f"size={size},mode=0700"
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a {size} tmpfs (needs root): {done.stderr.strip()}")
        mounted.append(mount_point)
        return mount_point

    yield mount
    for mount_point in reversed(mounted):
        if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount_point)], check=True)
