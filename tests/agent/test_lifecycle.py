"""Start-up, signals and systemd integration of the real agent process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

Agent = Any  # conftest.AgentProcess


def slow_graph(n: int = 1500, features: int = 64) -> dict[str, Any]:
    rng = np.random.default_rng(3)
    edges = rng.integers(0, n, (2, 6 * n)).tolist()
    return {"num_nodes": n, "edge_index": edges, "x": rng.random((n, features)).round(3).tolist()}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dgdm.agent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.mark.parametrize(
    ("toml", "env", "key"),
    [
        ("[http]\nprot = 8080\n", {}, "http.prot"),
        ("[device]\nid = 'bad id!'\n", {}, "device.id"),
        ("[kernels]\nworkers = 'two'\n", {}, "kernels.workers"),
        ("[nope]\n", {}, "nope"),
        ("[http]\nbind = '0.0.0.0'\n", {}, "http.token"),
        ("", {"DGDM__SYNC__MAX_OUTBOX_BYTES": "lots"}, "sync.max_outbox_bytes"),
        ("[sync]\nbroker_url = 'mqtt://127.0.0.1:1'\n", {}, "sync.coordinator_public_key"),
    ],
)
def test_bad_config_exits_2_naming_the_key(
    tmp_path: Path, toml: str, env: dict[str, str], key: str
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(toml, encoding="utf-8")
    done = run_cli("agent", "--config", str(config), env=env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert key in lines[0]


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    done = run_cli("agent", "--config", str(tmp_path / "absent.toml"))
    assert done.returncode == 2
    assert "absent.toml" in done.stderr


def test_sigterm_drains_in_flight_work(start_agent: Any) -> None:
    agent = start_agent({"kernels": {"backend": "numpy"}})
    answers: list[Any] = []
    worker = threading.Thread(
        target=lambda: answers.append(agent.post_json("/diffuse", slow_graph()))
    )
    worker.start()
    deadline = time.monotonic() + 10
    while agent.get("/status").json()["queue"]["in_flight"] == 0:
        assert time.monotonic() < deadline, "the diffusion never started"
        time.sleep(0.005)
    started = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    worker.join(15)
    assert agent.proc.wait(15) == 0
    assert time.monotonic() - started < 10
    assert answers[0].status == 200, answers[0].body
    messages = [line.get("msg") for line in agent.logs()]
    assert "agent stopped" in messages
    stopped = next(line for line in agent.logs() if line.get("msg") == "agent stopped")
    assert stopped["drained"] is True


def test_sighup_reloads_safe_settings_only(start_agent: Any) -> None:
    agent = start_agent({"tpu": {"temperature_limit_c": 80.0}, "log": {"level": "info"}})
    old_port = agent.port
    text = agent.config_path.read_text(encoding="utf-8")
    text = text.replace("temperature_limit_c = 80.0", "temperature_limit_c = 70.0")
    text = text.replace(f"port = {old_port}", f"port = {old_port + 1}")
    agent.config_path.write_text(text, encoding="utf-8")
    agent.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while agent.get("/status").json()["config"]["tpu"]["temperature_limit_c"] != 70.0:
        assert time.monotonic() < deadline, agent.log_tail()
        time.sleep(0.05)
    status = agent.get("/status").json()
    assert status["config"]["http"]["port"] == old_port
    assert status["tpu"]["temperature_limit_c"] == 70.0
    reload_line = next(line for line in agent.logs() if line.get("msg") == "config reloaded")
    assert reload_line["applied"] == ["tpu.temperature_limit_c"]
    assert reload_line["needs_restart"] == ["http.port"]


def test_sighup_with_broken_config_keeps_running(start_agent: Any) -> None:
    agent = start_agent()
    agent.config_path.write_text("[http]\nnot_a_key = 1\n", encoding="utf-8")
    agent.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not any(line.get("msg", "").startswith("reload refused") for line in agent.logs()):
        assert time.monotonic() < deadline, agent.log_tail()
        time.sleep(0.05)
    assert agent.get("/healthz").status == 200


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_ready_watchdog_stopping(
    start_agent: Any, tmp_path: Path, abstract: bool
) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"@dgdm-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind("\0" + name[1:])
    else:
        name = str(tmp_path / "notify.sock")
        sock.bind(name)
    sock.settimeout(20)
    env = {"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "400000"}
    with sock:
        agent = start_agent(env=env, wait=False)
        seen = _receive_until(sock, "WATCHDOG=1")
        assert any("READY=1" in m for m in seen)
        assert seen.index(next(m for m in seen if "READY=1" in m)) < len(seen) - 1
        agent.proc.send_signal(signal.SIGTERM)
        assert any("STOPPING=1" in m for m in _receive_until(sock, "STOPPING=1"))
        assert agent.proc.wait(15) == 0


def _receive_until(sock: socket.socket, wanted: str) -> list[str]:
    seen: list[str] = []
    while not any(wanted in m for m in seen):
        seen.append(sock.recv(4096).decode())
    return seen


def test_status_json_has_no_secrets(start_agent: Any, tmp_path: Path) -> None:
    secret = tmp_path / "token.txt"
    secret.write_text("tok-from-file\n", encoding="utf-8")
    agent = start_agent({"http": {"token": f"file:{secret}"}})
    assert agent.get("/status").status == 401  # the handle sent "file:..." as the token
    agent.token = "tok-from-file"
    status = agent.get("/status").json()
    assert status["config"]["http"]["token"] == "***"
    assert "tok-from-file" not in json.dumps(status)
    assert "tok-from-file" not in agent.log_path.read_text(encoding="utf-8")
