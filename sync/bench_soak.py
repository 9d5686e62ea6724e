"""`dgdm bench soak --minutes M`: one agent, one broker, one coordinator for M minutes.

All real and on loopback (`SoakRig`): a private mosquitto with persistence, `dgdm
coordinator` (SQLite store) and `dgdm agent` as processes. Load at twice the defaults
(telemetry sampled every 5 s and batched every 30 s), plus results (`POST
/diffuse?queue=1`, `--results-per-s`) and a `ping` command every 10 s through the
coordinator's API; the broker is restarted (SIGTERM, saved, started again on the same port)
every `--broker-restart-s`.

Every 10 s it samples each process's RSS and open fds, the SQLite files (the agent's outbox,
the coordinator's store, each with its WAL) and the agent's loop lag (`/status`). After the
warm-up (`--warmup-minutes`, default a fifth of the run, at least one sample) it fails when
the agent's or coordinator's RSS or open fds grow by more than 5 % (the median of the last
three samples against the first three; fds also by at least 2, since one socket may be
mid-reconnect), or when the outbox file exceeds `sync.max_outbox_bytes` by more than the
5 % the outbox promises. It prints the slopes (per hour, least squares after the warm-up),
the verdict and, with `--json`, every sample.

`SoakRig` is also the rig of the clock tests (tests/sync/test_clock_process.py): the agent
can run under a command prefix and environment (libfaketime) with settings of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgdm.sync.child_procs import toml_text, wait_or_kill

DEVICE_ID = "soak-edge-1"
SAMPLE_S = 10.0
GROWTH_LIMIT = 0.05
FD_MIN_GROWTH = 2
READY_TIMEOUT_S = 60.0
OUTBOX_CAP = 16 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the run")
    parser.add_argument("--warmup-minutes", type=float, default=None, help="default: 1/5 of it")
    parser.add_argument("--results-per-s", type=float, default=2.0, help="queued results/s")
    parser.add_argument("--broker-restart-s", type=float, default=120.0, help="0: never")
    parser.add_argument("--sample-s", type=float, default=SAMPLE_S, help="sampling period")
    parser.add_argument("--outbox-cap", type=int, default=OUTBOX_CAP, help="max_outbox_bytes")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="dgdm-bench-soak-") as tmp:
        report = run(Path(tmp), args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0 if report["ok"] else 1


# -- the rig ------------------------------------------------------------------------------


def _merge(base: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {k: {**base.get(k, {}), **extra.get(k, {})} for k in {**base, **extra}}


@dataclass
class SoakRig:
    """Broker + coordinator + agent processes in `root`; `start()`, then `stop()`."""

    root: Path
    agent_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    agent_prefix: list[str] = field(default_factory=list)
    agent_env: dict[str, str] = field(default_factory=dict)
    coordinator_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    broker: Any = None
    agent: subprocess.Popen[bytes] | None = None
    coordinator: subprocess.Popen[bytes] | None = None
    agent_port: int = 0
    api_port: int = 0

    @property
    def agent_data(self) -> Path:
        return self.root / "agent"

    @property
    def store_path(self) -> Path:
        return self.root / "coordinator" / "coordinator.db"

    def start(self) -> SoakRig:
        from dgdm.sync.broker import Broker, free_port
        from dgdm.sync.crypto import generate_keypair

        self.root.mkdir(parents=True, exist_ok=True)
        self.broker = Broker(self.root / "broker").start()
        keys = self.root / "keys"
        device_key, _, device_pub = generate_keypair(keys, name="device")
        coord_key, _, coord_pub = generate_keypair(keys, name="coordinator")
        self.api_port, self.agent_port = free_port(), free_port()
        coord_config = self._write_coordinator_config(coord_key)
        _enrol(coord_config, DEVICE_ID, device_pub)
        argv = [sys.executable, "-m", "dgdm.agent", "coordinator", "--config", str(coord_config)]
        self.coordinator = self._spawn(argv, "coordinator")
        self._wait(self.coordinator, "coordinator", lambda: self.api("GET", "/healthz"))
        agent_config = self._write_agent_config(device_key, coord_pub)
        argv = [sys.executable, "-m", "dgdm.agent", "agent", "--config", str(agent_config)]
        preloaded = "LD_PRELOAD" in (self.agent_env or {})
        for attempt in (1, 2):
            self.agent = self._spawn([*self.agent_prefix, *argv], "agent", self.agent_env)
            try:
                self._wait(self.agent, "agent", lambda: self.agent_get("/healthz"))
                break
            except RuntimeError:
                # libfaketime's LD_PRELOAD shim now and then segfaults a Python process as it
                # starts (seen once in CI: exit -11 before the agent logged a line); the
                # same agent without it never did. One more try, only then.
                crashed = (self.agent.returncode or 0) < 0
                if not (preloaded and crashed and attempt == 1):
                    raise
        return self

    def stop(self) -> None:
        for proc in (self.agent, self.coordinator):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (self.agent, self.coordinator):
            if proc is not None:
                wait_or_kill(proc, 15)
        if self.broker is not None:
            self.broker.stop()

    def __enter__(self) -> SoakRig:
        try:
            return self.start()
        except BaseException:
            self.stop()  # what did start: no process outlives a failed start
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- talking to the parts --------------------------------------------------------

    def api(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Any:
        """The coordinator's HTTP API with the token: the JSON answer (HTTPError raised)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}{path}", data=data, method=method
        )
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - our own loopback API
            return json.loads(resp.read())

    def agent_get(self, path: str, timeout: float = 10.0) -> Any:
        url = f"http://127.0.0.1:{self.agent_port}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())

    def agent_post(self, path: str, body: Any, timeout: float = 30.0) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.agent_port}{path}",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - our own loopback agent
            return json.loads(resp.read())

    def agent_metric(self, name: str, labels: str = "") -> float:
        """One sample of the agent's /metrics (0 when absent)."""
        url = f"http://127.0.0.1:{self.agent_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            head, _, value = line.rpartition(" ")
            if head == wanted:
                return float(value)
        return 0.0

    # -- start-up ----------------------------------------------------------------------

    def _spawn(
        self, argv: list[str], name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with (self.root / f"{name}.log").open("ab") as log:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env)

    def log_tail(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-3000:]

    def _wait(self, proc: subprocess.Popen[bytes], name: str, probe: Any) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode}: {self.log_tail(name)}")
            with contextlib.suppress(OSError, ValueError):
                probe()
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} not healthy within {READY_TIMEOUT_S:.0f} s")

    def _write_coordinator_config(self, key: Path) -> Path:
        base: dict[str, dict[str, Any]] = {
            "coordinator": {"data_dir": str(self.root / "coordinator"), "private_key": str(key)},
            "mqtt": {"broker_url": self.broker.url, "session_expiry_s": 300},
            "http": {"port": self.api_port, "token": self.token},
        }
        path = self.root / "coordinator.toml"
        path.write_text(toml_text(_merge(base, self.coordinator_settings)))
        return path

    def _write_agent_config(self, key: Path, coord_pub: str) -> Path:
        base: dict[str, dict[str, Any]] = {
            "device": {"id": DEVICE_ID, "data_dir": str(self.agent_data), "private_key": str(key)},
            "http": {"port": self.agent_port},
            "sync": {"broker_url": self.broker.url, "coordinator_public_key": coord_pub},
            "kernels": {"backend": "numpy"},
            "log": {"level": "warning"},
        }
        path = self.root / "agent.toml"
        path.write_text(toml_text(_merge(base, self.agent_settings)))
        return path


def _enrol(config: Path, device_id: str, public_b64: str) -> None:
    """What `dgdm coordinator devices add` does, before the coordinator starts."""
    from dgdm.sync.coordinator.config import load_config
    from dgdm.sync.coordinator.stores import open_store

    store = open_store(load_config(config))
    try:
        store.add_device(device_id, public_b64)
    finally:
        store.close()


# -- sampling -----------------------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def file_bytes(path: Path) -> int:
    """A SQLite database with its WAL and shared-memory files."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            total += Path(f"{path}{suffix}").stat().st_size
    return total


def take_sample(rig: SoakRig, t_s: float) -> dict[str, Any]:
    assert rig.agent is not None
    assert rig.coordinator is not None
    sample: dict[str, Any] = {"t_s": round(t_s, 1)}
    for name, proc in (("agent", rig.agent), ("coordinator", rig.coordinator)):
        sample[f"{name}_rss"] = rss_bytes(proc.pid)
        sample[f"{name}_fds"] = open_fds(proc.pid)
    sample["broker_rss"] = rss_bytes(rig.broker.pid) if rig.broker.pid else None
    sample["outbox_bytes"] = file_bytes(rig.agent_data / "outbox.db")
    sample["store_bytes"] = file_bytes(rig.store_path)
    try:
        status = rig.agent_get("/status")
        sample["loop_lag_ms"] = status.get("loop_lag_ms")
        sample["outbox_messages"] = status["outbox"].get("messages")
    except (OSError, ValueError, KeyError):
        sample["loop_lag_ms"] = None
    return sample


# -- analysis (pure) ----------------------------------------------------------------------


def slope_per_hour(samples: list[dict[str, Any]], key: str) -> float | None:
    points = [(s["t_s"], s[key]) for s in samples if s.get(key) is not None]
    if len(points) < 2 or len({t for t, _ in points}) < 2:
        return None
    fit = statistics.linear_regression([t for t, _ in points], [v for _, v in points])
    return fit.slope * 3600.0


def growth(samples: list[dict[str, Any]], key: str) -> tuple[float, float] | None:
    """(first, last): the medians of the first and last three samples of `key`."""
    values = [s[key] for s in samples if s.get(key) is not None]
    if len(values) < 2:
        return None
    head = values[: min(3, len(values) // 2)]
    tail = values[-len(head) :]
    return statistics.median(head), statistics.median(tail)


def verdict(samples: list[dict[str, Any]], warmup_s: float, outbox_cap: int) -> list[str]:
    """What failed (empty: passed): growth after the warm-up, or an outbox over its cap."""
    after = [s for s in samples if s["t_s"] >= warmup_s]
    problems = []
    for part in ("agent", "coordinator"):
        for what, min_abs in (("rss", 0), ("fds", FD_MIN_GROWTH)):
            key = f"{part}_{what}"
            pair = growth(after, key)
            if pair is None:
                continue
            first, last = pair
            if last > first * (1 + GROWTH_LIMIT) and last - first >= min_abs:
                problems.append(f"{key} grew {first:.0f} -> {last:.0f} (> 5 %)")
    biggest = max((s["outbox_bytes"] for s in samples), default=0)
    if biggest > outbox_cap * (1 + GROWTH_LIMIT):
        problems.append(f"outbox file {biggest} bytes > its cap {outbox_cap} + 5 %")
    return problems


# -- the run ------------------------------------------------------------------------------


def _soak_settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Twice the default telemetry rates (interval 10 s, batch 60 s)."""
    return {
        "telemetry": {"interval_s": 5.0, "batch_s": 30.0},
        "sync": {"max_outbox_bytes": args.outbox_cap},
    }


def soak_graph(i: int) -> dict[str, Any]:
    """The embedded karate club graph, its features varied by `i`."""
    import importlib.resources

    text = importlib.resources.files("dgdm.kernels").joinpath("data/karate.json").read_text()
    graph = json.loads(text)
    for n, node in enumerate(graph["nodes"]):
        node["features"] = [float((i + n) % 7), 1.0]
    return {**graph, "graph_id": f"soak-{i % 16}"}


@dataclass
class _Tally:
    duration_s: float
    warmup_s: float
    samples: list[dict[str, Any]] = field(default_factory=list)
    accepted: int = 0
    refused: int = 0
    commands: list[int] = field(default_factory=list)
    command_errors: int = 0
    broker_restarts: int = 0


def run(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    duration_s = args.minutes * 60.0
    warmup_s = duration_s / 5 if args.warmup_minutes is None else args.warmup_minutes * 60.0
    tally = _Tally(duration_s, warmup_s)
    with SoakRig(root, agent_settings=_soak_settings(args)) as rig:
        _drive(rig, args, tally)
        stored, replied = _settle(rig, tally)
    return _report(args, tally, stored, replied)


def _drive(rig: SoakRig, args: argparse.Namespace, tally: _Tally) -> None:
    start = time.monotonic()
    next_sample = next_result = next_command = start
    next_restart = start + args.broker_restart_s if args.broker_restart_s > 0 else float("inf")
    i = 0
    while (now := time.monotonic()) < start + tally.duration_s:
        if now >= next_sample:
            tally.samples.append(take_sample(rig, now - start))
            next_sample += args.sample_s
        if now >= next_restart:
            rig.broker.restart()
            tally.broker_restarts += 1
            next_restart += args.broker_restart_s
        if now >= next_command:
            body = {"cmd": "ping", "args": {}, "ttl_ms": 120_000}
            try:
                tally.commands.append(
                    rig.api("POST", f"/devices/{DEVICE_ID}/commands", body)["seq"]
                )
            except (OSError, ValueError):
                tally.command_errors += 1
            next_command += 10.0
        if args.results_per_s > 0 and now >= next_result:
            try:
                rig.agent_post("/diffuse?queue=1", soak_graph(i))
                tally.accepted += 1
            except (OSError, ValueError):
                tally.refused += 1
            i += 1
            next_result += 1.0 / args.results_per_s
        time.sleep(max(0.0, min(next_sample, next_result, next_command) - time.monotonic()))
    tally.samples.append(take_sample(rig, time.monotonic() - start))


def _settle(rig: SoakRig, tally: _Tally, timeout_s: float = 120.0) -> tuple[int, int]:
    """Wait until every accepted result is stored and every command replied (or timeout)."""
    deadline = time.monotonic() + timeout_s
    stored = replied = 0
    while True:
        stored = _count_results(rig)
        replied = sum(1 for seq in tally.commands if _replied(rig, seq))
        done = stored >= tally.accepted and replied == len(tally.commands)
        if done or time.monotonic() > deadline:
            return stored, replied
        time.sleep(2.0)


def _count_results(rig: SoakRig) -> int:
    since, total = 0, 0
    while True:
        page = rig.api("GET", f"/devices/{DEVICE_ID}/results?since={since}&limit=1000")
        total += len(page["results"])
        if not page["results"]:
            return total
        since = page["next"]


def _replied(rig: SoakRig, seq: int) -> bool:
    try:
        return rig.api("GET", f"/devices/{DEVICE_ID}/commands/{seq}")["status"] == "replied"
    except (OSError, ValueError):
        return False


SLOPE_KEYS = (
    "agent_rss",
    "agent_fds",
    "coordinator_rss",
    "coordinator_fds",
    "broker_rss",
    "outbox_bytes",
    "store_bytes",
    "loop_lag_ms",
)


def _report(args: argparse.Namespace, tally: _Tally, stored: int, replied: int) -> dict[str, Any]:
    samples = tally.samples
    after = [s for s in samples if s["t_s"] >= tally.warmup_s]
    problems = verdict(samples, tally.warmup_s, args.outbox_cap)
    if stored < tally.accepted:
        problems.append(f"{tally.accepted - stored} accepted results never stored")
    if replied < len(tally.commands):
        problems.append(f"{len(tally.commands) - replied} commands without a reply")
    lags = [s["loop_lag_ms"] for s in samples if s.get("loop_lag_ms") is not None]
    growths = {k: growth(after, k) for k in SLOPE_KEYS[:4]}
    return {
        "ok": not problems,
        "problems": problems,
        "minutes": round(tally.duration_s / 60, 2),
        "warmup_s": round(tally.warmup_s, 1),
        "rates": {
            "results_per_s": args.results_per_s,
            "telemetry_interval_s": 5.0,
            "telemetry_batch_s": 30.0,
            "commands_per_s": 0.1,
            "broker_restart_s": args.broker_restart_s,
        },
        "results": {"accepted": tally.accepted, "refused": tally.refused, "stored": stored},
        "commands": {
            "sent": len(tally.commands),
            "replied": replied,
            "post_errors": tally.command_errors,
        },
        "broker_restarts": tally.broker_restarts,
        "slopes_per_hour": {k: _round(slope_per_hour(after, k)) for k in SLOPE_KEYS},
        "growth_after_warmup": {k: v for k, v in growths.items() if v is not None},
        "loop_lag_ms": {
            "median": _round(statistics.median(lags)) if lags else None,
            "max": _round(max(lags)) if lags else None,
        },
        "outbox_cap": args.outbox_cap,
        "samples": samples,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"soak {r['minutes']} min (warm-up {r['warmup_s']:.0f} s), broker restarts "
        f"{r['broker_restarts']}, results accepted {r['results']['accepted']} / stored "
        f"{r['results']['stored']}, commands {r['commands']['sent']} / replied "
        f"{r['commands']['replied']}",
        "slopes per hour after the warm-up:",
    ]
    for key, value in r["slopes_per_hour"].items():
        lines.append(f"  {key:18} {value if value is not None else '-'}")
    for key, (first, last) in r["growth_after_warmup"].items():
        lines.append(f"  {key:18} {first:.0f} -> {last:.0f}")
    lag = r["loop_lag_ms"]
    lines.append(f"loop lag ms: median {lag['median']}, max {lag['max']}")
    lines.append("samples: " + json.dumps(r["samples"]))
    lines.append("PASS" if r["ok"] else "FAIL: " + "; ".join(r["problems"]))
    return "\n".join(lines)
