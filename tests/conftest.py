"""Shared fixtures: private MQTT brokers on free loopback ports (never the system's 1883).

- `mqtt_broker` (session): plain mosquitto, MQTT 5 and 3.1.1, anonymous; `broker.url`.
- `tls_broker` (session): mosquitto with TLS and required client certificates (mutual TLS);
  `broker.tls` holds `ca_file`, `client_cert`, `client_key`.
- `fresh_broker` (function): a broker of its own, for tests that `kill()` (SIGKILL),
  `stop()` or `restart()` it; it saves on every change (`save_on_change`) and its data
  directory survives restarts, so persistent sessions and queued messages survive a SIGKILL
  (slow: ~800 msg/s; the session brokers are fast and save only at a clean stop).

Each broker has its own config, data dir and log under a pytest tmp dir and is stopped by
pid at the end. Session brokers are shared: use unique device and client ids per test
(e.g. `unique_id`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from dgdm.sync.broker import Broker

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
