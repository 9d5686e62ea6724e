"""SIGTERM during a heavy diffusion (issue 20, item 5), against the real agent process: it
exits within the unit's TimeoutStopSec (systemd/dgdm-agent.service), and a result accepted
into the outbox before is still there after a restart."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dgdm.sync.crypto import generate_keypair

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "dgdm-agent.service"
KARATE = REPO / "fixtures" / "karate.json"


def timeout_stop_s() -> float:
    match = re.search(r"^TimeoutStopSec=(\d+)s$", UNIT.read_text(), re.MULTILINE)
    assert match is not None
    return float(match.group(1))


def heavy_body(n: int) -> bytes:
    """Exact PPR on a directed random graph with a small teleport: seconds to minutes."""
    rng = np.random.default_rng(5)
    body = {
        "num_nodes": n,
        "edge_index": rng.integers(0, n, size=(2, 5 * n)).tolist(),
        "x": np.round(rng.random((n, 2)), 3).tolist(),
        "directed": True,
        "method": {"kind": "ppr", "k": None, "alpha": 0.001, "normalization": "row"},
    }
    return json.dumps(body).encode()


def results(agent: Any) -> int:
    kinds = agent.get("/outbox").json()["kinds"]
    return int(kinds.get("result", {}).get("messages", 0))


def test_sigterm_mid_diffusion_exits_in_time_and_keeps_the_outbox(
    start_agent: Callable[..., Any], tmp_path: Path
) -> None:
    _, _, coord_pub = generate_keypair(tmp_path / "keys", name="coordinator")
    device_key, _, _ = generate_keypair(tmp_path / "keys", name="device")
    sections = {
        "device": {"data_dir": str(tmp_path / "data"), "private_key": str(device_key)},
        "sync": {"coordinator_public_key": coord_pub},
    }
    agent = start_agent(sections)
    queued = agent.request("POST", "/diffuse?queue=1", KARATE.read_bytes())
    assert queued.status == 200, queued.body
    assert results(agent) == 1
    heavy: list[Any] = []
    body = heavy_body(30_000)
    runner = threading.Thread(
        target=lambda: heavy.append(agent.request("POST", "/diffuse", body, timeout=120.0))
    )
    runner.start()
    time.sleep(3.0)  # read, parsed, diffusing
    assert runner.is_alive()
    start = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    limit = timeout_stop_s()
    try:
        agent.proc.wait(limit + 5)
    finally:
        took = time.monotonic() - start
        if agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait()
    runner.join(30)
    print(f"SIGTERM mid-diffusion: exit {agent.proc.returncode} after {took:.2f} s")
    assert took < limit, f"exited after {took:.1f} s, TimeoutStopSec is {limit} s"
    assert agent.proc.returncode == 0
    again = start_agent(sections)
    assert results(again) == 1
