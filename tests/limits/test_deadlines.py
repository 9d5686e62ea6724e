"""Every connection has a deadline (issue 20, item 1), against the real agent process and
the coordinator's API (same keys): a connection that sends nothing, or only part of its
headers, or stays idle after a response, is closed after http.header_timeout_s; a body
slower than http.body_min_bytes_per_s is cut off (and counted) while a fast one of the
same size is answered."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

KARATE = Path(__file__).resolve().parents[2] / "fixtures" / "karate.json"
TIMEOUT_S = 1.0


def closed_after(sock: socket.socket, limit_s: float, start: float | None = None) -> float:
    """Seconds from `start` (default: now) until the agent closes `sock` (any answer read
    and dropped)."""
    start = time.monotonic() if start is None else start
    sock.settimeout(limit_s)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        raise AssertionError(f"still open after {limit_s} s") from None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def connect(agent: Any) -> socket.socket:
    return socket.create_connection(("127.0.0.1", agent.port))


def assert_silent_partial_and_idle_closed(server: Any) -> None:
    with connect(server) as silent, connect(server) as partial, connect(server) as idle:
        start = time.monotonic()
        partial.sendall(b"GET /healthz HTTP/1.1\r\nHost: local")
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        for sock in (silent, partial, idle):
            assert TIMEOUT_S * 0.5 < closed_after(sock, 3 * TIMEOUT_S, start) < 2.5 * TIMEOUT_S


def send_slowly(server: Any, head: bytes, body: bytes) -> tuple[float, bytes]:
    """Sends `head` and `body` at ~20 KB/s until the server answers or drops the connection
    (10 s at the most): the seconds that took, and the answer."""
    with connect(server) as slow:
        slow.sendall(head + body[:1000])
        start = time.monotonic()
        slow.settimeout(0.05)
        sent, answer = 1000, b""
        while time.monotonic() - start < 10.0:
            try:
                slow.sendall(body[sent : sent + 1000])
                sent += 1000
                answer += slow.recv(4096)
                if answer:
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        return time.monotonic() - start, answer


def test_silent_partial_and_idle_connections_are_closed(start_agent: Callable[..., Any]) -> None:
    agent = start_agent({"http": {"header_timeout_s": TIMEOUT_S}, "kernels": {"backend": "numpy"}})
    assert_silent_partial_and_idle_closed(agent)
    with connect(agent) as dripping:  # data does not extend the deadline
        start = time.monotonic()
        try:
            for byte in b"GET /healthz HTTP/1.1\r\n":
                dripping.sendall(bytes([byte]))
                time.sleep(0.1)
        except OSError:
            pass
        assert time.monotonic() - start + closed_after(dripping, 3.0) < 2.5 * TIMEOUT_S


def test_a_slow_body_is_cut_off_and_a_fast_one_answered(start_agent: Callable[..., Any]) -> None:
    agent = start_agent(
        {"http": {"body_min_bytes_per_s": 64 * 1024}, "kernels": {"backend": "numpy"}}
    )
    graph = json.loads(KARATE.read_text(encoding="utf-8"))
    body = json.dumps(graph).encode()
    body += b" " * (1_000_000 - len(body))  # 1 MB: a deadline of 1 s + 15 s at 64 KB/s
    head = (
        "POST /diffuse HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    cut_after, answer = send_slowly(agent, head, body)
    assert cut_after < 4.0, cut_after  # needed 64 KB by 2 s, 128 KB by 3 s
    assert not answer.startswith(b"HTTP/1.1 200")
    with connect(agent) as fast:
        fast.sendall(head + body)
        fast.settimeout(10)
        assert fast.recv(4096).startswith(b"HTTP/1.1 200")
    metrics = agent.get("/metrics").body.decode()
    assert 'dgdm_http_refused_total{reason="slow_body"} 1.0' in metrics
    assert agent.proc.poll() is None


def test_the_open_file_soft_limit_is_raised_to_the_hard_one(
    start_agent: Callable[..., Any],
) -> None:
    agent = start_agent({"kernels": {"backend": "numpy"}}, prefix=["prlimit", "--nofile=256:4096"])
    limits = Path(f"/proc/{agent.proc.pid}/limits").read_text()
    line = next(row for row in limits.splitlines() if row.startswith("Max open files"))
    assert line.split()[3:5] == ["4096", "4096"], line


# -- the coordinator's API: the same deadlines under the same [http] keys ------------------


def test_coordinator_closes_silent_partial_and_idle_connections(
    start_coordinator: Callable[..., Any],
) -> None:
    coordinator = start_coordinator(http={"header_timeout_s": TIMEOUT_S})
    assert_silent_partial_and_idle_closed(coordinator)


def test_coordinator_cuts_off_a_slow_body_and_answers_a_fast_one(
    start_coordinator: Callable[..., Any], tmp_path: Path
) -> None:
    from dgdm.sync.crypto import generate_keypair

    _, _, public_key = generate_keypair(tmp_path / "keys", name="edge-slow")
    coordinator = start_coordinator(devices={"edge-slow": public_key})
    body = json.dumps({"cmd": "ping"}).encode()
    body += b" " * (1_000_000 - len(body))  # 1 MB: a deadline of 1 s + 15 s at 64 KB/s
    head = (
        "POST /devices/edge-slow/commands HTTP/1.1\r\nHost: localhost\r\n"
        f"Authorization: Bearer {coordinator.token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    cut_after, answer = send_slowly(coordinator, head, body)
    assert cut_after < 4.0, cut_after
    assert not answer.startswith(b"HTTP/1.1 202")
    with connect(coordinator) as fast:
        fast.sendall(head + body)
        fast.settimeout(10)
        assert fast.recv(4096).startswith(b"HTTP/1.1 202")  # the command was sent
    metrics = coordinator.get("/metrics").body.decode()
    assert 'dgdm_coordinator_http_refused_total{reason="slow_body"} 1.0' in metrics


def test_coordinator_raises_the_open_file_soft_limit(
    start_coordinator: Callable[..., Any],
) -> None:
    coordinator = start_coordinator(prefix=["prlimit", "--nofile=256:4096"])
    limits = Path(f"/proc/{coordinator.proc.pid}/limits").read_text()
    line = next(row for row in limits.splitlines() if row.startswith("Max open files"))
    assert line.split()[3:5] == ["4096", "4096"], line
