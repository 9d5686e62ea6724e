"""The private broker launcher: plain, TLS, kill and restart on the same port."""

from __future__ import annotations

import socket
import ssl

import pytest

from dgdm.sync.broker import Broker, BrokerError


def test_plain_broker_listens(mqtt_broker: Broker) -> None:
    assert mqtt_broker.is_running()
    assert mqtt_broker.url.startswith("mqtt://127.0.0.1:")
    with socket.create_connection((mqtt_broker.host, mqtt_broker.port), 1):
        pass


def test_tls_broker_requires_a_client_certificate(tls_broker: Broker) -> None:
    assert tls_broker.tls is not None
    ctx = ssl.create_default_context(cafile=str(tls_broker.tls.ca_file))
    ctx.load_cert_chain(str(tls_broker.tls.client_cert), str(tls_broker.tls.client_key))
    with socket.create_connection((tls_broker.host, tls_broker.port), 2) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() is not None


def test_kill_and_restart_keeps_the_port(fresh_broker: Broker) -> None:
    port, pid = fresh_broker.port, fresh_broker.pid
    fresh_broker.kill()
    assert not fresh_broker.is_running()
    fresh_broker.start()
    assert fresh_broker.port == port
    assert fresh_broker.pid != pid


def test_amqtt_refuses_tls(tmp_path) -> None:
    with pytest.raises(BrokerError, match="amqtt"):
        Broker(tmp_path, engine="amqtt", tls=True)
