"""Fair share under a flood (marker `flood`): one device with its own real key publishes
valid sealed telemetry as fast as one socket gets it through mosquitto, while agent A posts
10 results/s with `?queue=1`. Real processes: mosquitto, `dgdm coordinator`, `dgdm agent`.

Pass: every A result stored exactly once; A's accepted -> visible in the coordinator API
p95 <= 5 s and max <= 15 s during the flood; coordinator RSS within +200 MB of idle; API p99
<= 200 ms; B's stored rows within its quota.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from dgdm.sync.broker import Broker, free_port
from dgdm.sync.child_procs import terminate, toml_text
from dgdm.sync.crypto import generate_keypair

pytestmark = pytest.mark.flood

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
KARATE = REPO / "fixtures" / "karate.json"
FLOOD_S = float(os.environ.get("DGDM_FLOOD_S", "30"))
TOKEN = "flood-token"
TELEMETRY_PER_S = 20.0
BURST_S = 30.0


def _dgdm(*args: str) -> list[str]:
    return [sys.executable, "-m", "dgdm.agent", *args]


def _http(url: str, *, body: bytes | None = None, token: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def _wait(url: str, token: str | None, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        with contextlib.suppress(OSError):
            if _http(url, token=token)[0] == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"{url} not up: {log.read_text(errors='replace')[-3000:]}")


@dataclass
class Fleet:
    root: Path
    broker: Broker
    coord_port: int
    agent_port: int
    flood_key: Path
    coord_pub: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    coordinator: subprocess.Popen[bytes] | None = None

    def api(self, path: str) -> tuple[int, Any]:
        return _http(f"http://127.0.0.1:{self.coord_port}{path}", token=TOKEN)

    def start(self, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        with (self.root / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            terminate(proc, 20)
        self.broker.stop()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    # the queue bound the dgdm_broker role sets (dgdm_broker_max_queued_messages)
    broker = Broker(tmp_path / "broker", max_queued_messages=100_000).start()
    keys = tmp_path / "keys"
    coord_key, _, coord_pub = generate_keypair(keys, name="coordinator")
    a_key, _, a_pub = generate_keypair(keys, name="edge-a")
    b_key, _, b_pub = generate_keypair(keys, name="edge-b")
    coord_port, agent_port = free_port(), free_port()
    coord_cfg = tmp_path / "coordinator.toml"
    coord_cfg.write_text(
        toml_text(
            {
                "coordinator": {"data_dir": str(tmp_path / "coord"), "private_key": str(coord_key)},
                "mqtt": {"broker_url": broker.url, "client_id": "coord-flood"},
                "http": {"port": coord_port, "token": TOKEN},
                "ingest": {"telemetry_per_s": TELEMETRY_PER_S, "burst_s": BURST_S},
            }
        )
    )
    for device, pub in (("edge-a", a_pub), ("edge-b", b_pub)):
        subprocess.run(
            _dgdm(
                "coordinator",
                "devices",
                "add",
                device,
                "--public-key",
                pub,
                "--config",
                str(coord_cfg),
            ),
            check=True,
            capture_output=True,
        )
    fleet = Fleet(tmp_path, broker, coord_port, agent_port, b_key, coord_pub)
    try:
        fleet.coordinator = fleet.start(
            _dgdm("coordinator", "--config", str(coord_cfg)), "coordinator"
        )
        _wait(
            f"http://127.0.0.1:{coord_port}/devices",
            TOKEN,
            fleet.coordinator,
            tmp_path / "coordinator.log",
        )
        agent_cfg = tmp_path / "agent.toml"
        agent_cfg.write_text(
            toml_text(
                {
                    "device": {
                        "id": "edge-a",
                        "data_dir": str(tmp_path / "agent"),
                        "private_key": str(a_key),
                    },
                    "http": {"port": agent_port},
                    "sync": {"broker_url": broker.url, "coordinator_public_key": coord_pub},
                    "kernels": {"backend": "numpy"},
                }
            )
        )
        agent = fleet.start(_dgdm("agent", "--config", str(agent_cfg)), "agent")
        _wait(f"http://127.0.0.1:{agent_port}/healthz", None, agent, tmp_path / "agent.log")
        yield fleet
    finally:
        fleet.stop()


class Probe:
    """Agent A's results, posted at 10/s, and when each became visible in the API."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.graph = KARATE.read_bytes()
        self.accepted: dict[str, float] = {}
        self.visible: dict[str, float] = {}
        self.stored: list[str] = []
        self.api_ms: list[float] = []
        self.cursor = 0
        self.stop = threading.Event()

    def post(self) -> None:
        url = f"http://127.0.0.1:{self.fleet.agent_port}/diffuse?queue=1"
        while not self.stop.is_set():
            status, answer = _http(url, body=self.graph)
            assert status == 200, answer
            self.accepted[answer["job_id"]] = time.monotonic()
            self.stop.wait(0.1)

    def poll_once(self) -> None:
        t0 = time.monotonic()
        status, page = self.fleet.api(f"/devices/edge-a/results?since={self.cursor}&limit=1000")
        now = time.monotonic()
        self.api_ms.append((now - t0) * 1000)
        assert status == 200, page
        for row in page["results"]:
            job = row["body"]["job_id"]
            self.stored.append(job)
            self.visible.setdefault(job, now)
        self.cursor = page["next"]

    def poll(self) -> None:
        while not self.stop.is_set():
            self.poll_once()
            self.stop.wait(0.05)

    def latencies(self, jobs: list[str]) -> list[float]:
        return [self.visible[j] - self.accepted[j] for j in jobs if j in self.visible]


def _rss(proc: subprocess.Popen[bytes]) -> float:
    return psutil.Process(proc.pid).memory_info().rss / 2**20


def _quantile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def test_one_device_flood_never_delays_another(fleet: Fleet) -> None:
    assert fleet.coordinator is not None
    probe = Probe(fleet)
    threads = [threading.Thread(target=probe.post), threading.Thread(target=probe.poll)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        idle_rss = _rss(fleet.coordinator)
        idle_api = len(probe.api_ms)
        flood_start = time.monotonic()
        out = fleet.root / "flood.json"
        flooder = fleet.start(
            [
                sys.executable,
                str(HERE / "flooder.py"),
                "127.0.0.1",
                str(fleet.broker.port),
                "edge-b",
                str(fleet.flood_key),
                fleet.coord_pub,
                str(FLOOD_S),
                str(out),
            ],
            "flooder",
        )
        peak_rss = idle_rss
        while flooder.poll() is None:
            peak_rss = max(peak_rss, _rss(fleet.coordinator))
            time.sleep(0.5)
        flood_end = time.monotonic()
        flood = json.loads(out.read_text())
        time.sleep(2)
    finally:
        probe.stop.set()
        for t in threads:
            t.join(30)
    during = [j for j, t in probe.accepted.items() if flood_start <= t <= flood_end]
    # everything A had accepted shows up once the flood is over
    deadline = time.monotonic() + 30
    while set(probe.accepted) - set(probe.visible) and time.monotonic() < deadline:
        probe.poll_once()
        time.sleep(0.2)
    lat = probe.latencies(during)
    baseline, api = probe.api_ms[:idle_api], probe.api_ms[idle_api:]
    _, device_b = fleet.api("/devices/edge-b")
    report = {
        "flood_msgs": flood["sent"],
        "flood_rate": round(flood["sent"] / flood["seconds"]),
        "a_results_during": len(during),
        "a_p50_s": round(statistics.median(lat), 3) if lat else None,
        "a_p95_s": round(_quantile(lat, 0.95), 3) if lat else None,
        "a_max_s": round(max(lat), 3) if lat else None,
        "idle_rss_mb": round(idle_rss),
        "peak_rss_mb": round(peak_rss),
        "api_p50_ms": round(statistics.median(api), 1),
        "api_p99_ms": round(_quantile(api, 0.99), 1),
        "api_p99_idle_ms": round(_quantile(baseline, 0.99), 1),
    }
    print("flood figures:", json.dumps(report))
    missing = set(probe.accepted) - set(probe.visible)
    assert not missing, f"{len(missing)} accepted results never stored: {report}"
    assert len(probe.stored) == len(set(probe.stored)), "a result was stored twice"
    assert len(lat) == len(during) > 0
    assert report["a_p95_s"] <= 5, report
    assert report["a_max_s"] <= 15, report
    assert peak_rss - idle_rss <= 200, report
    # 200 ms is the target on a quiet machine; where other work shares the cores, the
    # same-run baseline (no flood) scales it, so the flood's own cost is what is judged.
    assert report["api_p99_ms"] <= max(200, 4 * report["api_p99_idle_ms"]), report
    with urllib.request.urlopen(
        urllib.request.Request(
            f"http://127.0.0.1:{fleet.coord_port}/metrics",
            headers={"Authorization": f"Bearer {TOKEN}"},
        ),
        timeout=30,
    ) as resp:
        metrics = resp.read().decode()
    assert 'dgdm_coordinator_rejects_total{reason="rate_limited"}' in metrics
    _, ingest = fleet.api("/ingest")
    assert ingest["flooding"] == ["edge-b"], ingest
    assert device_b["flooding"] is True, device_b
    assert fleet.api("/devices/edge-a")[1]["flooding"] is False
    assert ingest["top_talkers"][0]["device_id"] == "edge-b", ingest
    # B's stored telemetry stays within its quota: burst + rate x time
    b_rows = _stored_telemetry(fleet)
    allowed = TELEMETRY_PER_S * (BURST_S + flood["seconds"] + 10)
    assert b_rows <= allowed, (b_rows, allowed, report)


def _stored_telemetry(fleet: Fleet) -> int:
    import sqlite3

    db = sqlite3.connect(fleet.root / "coord" / "coordinator.db")
    try:
        return int(
            db.execute(
                "SELECT count(*) FROM messages WHERE device_id = 'edge-b' AND kind = 2"
            ).fetchone()[0]
        )
    finally:
        db.close()
