"""Request bodies buffered at once are bounded (issue 20, item 2), in the agent and in the
coordinator's API.

20 clients (with the token) each send 59 MB of a body at full speed, then drip the rest.
The agent buffers at most http.max_inflight_body_bytes (256 MiB by default) across them
and refuses the others at once (503 + Retry-After, counted); its RSS stays within
+300 MB, and it answers /healthz and small diffusions throughout and afterwards. The same
20 bodies sent to the coordinator as commands for an enrolled device leave its RSS within
+300 MB, its API answering.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

KARATE = Path(__file__).resolve().parents[2] / "fixtures" / "karate.json"
CLIENTS = 20
BODY = 59_000_000
TOKEN = "limits-token"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class BigBody(threading.Thread):
    def __init__(self, port: int, path: str = "/diffuse") -> None:
        super().__init__(daemon=True)
        self.port = port
        self.path = path
        self.stop = threading.Event()
        self.answer = b""
        self.sent = 0

    def run(self) -> None:
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Length: {BODY}\r\n\r\n"
        ).encode()
        chunk = b" " * (1 << 20)
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            sock.settimeout(0.2)
            try:
                sock.sendall(head)
                while self.sent < BODY - 1000:
                    self.sent += sock.send(chunk[: BODY - 1000 - self.sent])
                    self._read(sock)
                while not self.stop.is_set():  # drip
                    sock.send(b" ")
                    self.sent += 1
                    self._read(sock)
            except OSError:
                self._read(sock)

    def _read(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.answer += sock.recv(4096)


def stop_and_report(clients: list[BigBody], label: str, before: int, peak: int) -> list[BigBody]:
    """Stops the clients, prints what they did to the RSS and returns those answered early."""
    buffered = sum(c.sent for c in clients if not c.answer)
    for client in clients:
        client.stop.set()
    for client in clients:
        client.join(10)
    refused = [c for c in clients if c.answer]
    print(
        f"\n{label}: RSS {before >> 20} -> peak {peak >> 20} MiB "
        f"(+{(peak - before) >> 20}); {len(refused)} answered early, "
        f"{buffered >> 20} MiB held by the others"
    )
    return refused


def assert_refused_for_the_budget(refused: list[BigBody]) -> None:
    for client in refused:
        assert client.answer.startswith(b"HTTP/1.1 503"), client.answer[:200]
        assert b"Retry-After: 1" in client.answer
        assert b"max_inflight_body_bytes" in client.answer


@pytest.mark.slow
def test_twenty_big_bodies_leave_rss_within_300_mb(start_agent: Callable[..., Any]) -> None:
    agent = start_agent({"http": {"token": TOKEN}, "kernels": {"backend": "numpy"}})
    small = json.dumps(json.loads(KARATE.read_text(encoding="utf-8"))).encode()
    assert agent.request("POST", "/diffuse", small).status == 200
    before = rss_bytes(agent.proc.pid)
    clients = [BigBody(agent.port) for _ in range(CLIENTS)]
    for client in clients:
        client.start()
    peak = before
    deadline = time.monotonic() + 8.0
    while time.monotonic() < deadline:
        peak = max(peak, rss_bytes(agent.proc.pid))
        assert agent.get("/healthz", timeout=5).status == 200
        assert agent.request("POST", "/diffuse", small, timeout=5).status == 200
        time.sleep(0.1)
    refused = stop_and_report(clients, "big bodies", before, peak)
    metrics = agent.get("/metrics").body.decode()
    assert peak - before < 300 * (1 << 20)
    assert 'dgdm_http_refused_total{reason="body_budget"}' in metrics
    assert_refused_for_the_budget(refused)
    time.sleep(0.5)
    assert agent.request("POST", "/diffuse", small).status == 200  # the budget came back


@pytest.mark.slow
def test_twenty_big_bodies_leave_coordinator_rss_within_300_mb(
    start_coordinator: Callable[..., Any], tmp_path: Path
) -> None:
    from dgdm.sync.crypto import generate_keypair

    _, _, public_key = generate_keypair(tmp_path / "keys", name="edge-big")
    coordinator = start_coordinator(devices={"edge-big": public_key})
    assert coordinator.token == TOKEN
    before = rss_bytes(coordinator.proc.pid)
    clients = [BigBody(coordinator.port, "/devices/edge-big/commands") for _ in range(CLIENTS)]
    for client in clients:
        client.start()
    peak = before
    answered = []
    deadline = time.monotonic() + 8.0
    while time.monotonic() < deadline:
        peak = max(peak, rss_bytes(coordinator.proc.pid))
        answered.append(coordinator.get("/healthz", token=False, timeout=5).status)
        answered.append(coordinator.get("/devices", timeout=5).status)
        time.sleep(0.1)
    refused = stop_and_report(clients, "coordinator big bodies", before, peak)
    metrics = coordinator.get("/metrics").body.decode()
    assert set(answered) == {200}
    assert peak - before < 300 * (1 << 20)
    assert 'dgdm_coordinator_http_refused_total{reason="body_budget"}' in metrics
    assert_refused_for_the_budget(refused)
    time.sleep(0.5)
    assert coordinator.get("/devices").status == 200
