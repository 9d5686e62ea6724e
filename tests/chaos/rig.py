"""The real parts of a chaos run and their start/stop by pid.

- `Netns`: a network namespace with a veth pair on a private /30 (the host end carries the
  broker's second listener); `ip link set ... down` inside it cuts the agent's link, `tc tbf`
  slows it.
- `ChaosBroker`: mosquitto with persistence saved on every change (a SIGKILL keeps what it
  acknowledged), listening on loopback and on the veth's host address.
- `PgCluster` (dgdm.sync.pgcluster): the store both coordinators share.
- `Part`: one restartable process (an agent, a coordinator, a load generator) with its log.
  `expected_down` is set while the harness itself has it stopped, so that any other exit
  is a crash.

Agent 0 runs in the namespace; agent 1 under libfaketime (its clock steps by rewriting a
file); agent 2 keeps its data dir on a small tmpfs that the disk fault fills.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgdm.sync.broker import Broker, free_port
from dgdm.sync.child_procs import toml_text, wait_or_kill

from .schedule import AGENTS, CLOCK_AGENT, DISK_AGENT, NETNS_AGENT, REPLICAS

REPO = Path(__file__).resolve().parents[2]
TOKEN = "chaos-token-" + base64.urlsafe_b64encode(os.urandom(9)).decode()
PG_PASSWORD_ENV = "DGDM_CHAOS_PG_PASSWORD"
FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
DISK_SIZE = "24m"


class Unavailable(RuntimeError):
    """This machine cannot run the chaos rig (no root, no netns, no PostgreSQL...)."""


def _ip(*argv: str) -> None:
    done = subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise Unavailable(f"`ip {' '.join(argv)}` failed: {done.stderr.strip()}")


class Netns:
    """`dgdmchaos<pid>` with veth `dch<pid>h` (host) <-> `dch<pid>n` (namespace)."""

    def __init__(self) -> None:
        pid = os.getpid()
        self.name = f"dgdmchaos{pid}"
        self.host_if, self.ns_if = f"dch{pid % 100000}h", f"dch{pid % 100000}n"
        base = 4 * (pid % 64)
        net = f"10.231.{(pid // 64) % 250}"
        self.host_ip, self.ns_ip = f"{net}.{base + 1}", f"{net}.{base + 2}"
        self.up = False

    def create(self) -> Netns:
        if os.geteuid() != 0:
            raise Unavailable("the chaos run needs root (ip netns, tmpfs, tc)")
        _ip("netns", "add", self.name)
        self.up = True
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.name)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", self.name, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        _ip("-n", self.name, "link", "set", self.ns_if, "up")
        _ip("-n", self.name, "link", "set", "lo", "up")
        return self

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def link(self, up: bool) -> None:
        _ip("-n", self.name, "link", "set", self.ns_if, "up" if up else "down")

    def slow(self, rate_kbit: int | None) -> None:
        """A token bucket on both ends (the agent's uplink and its downlink), or none."""
        for ns, dev in ((["-n", self.name], self.ns_if), ([], self.host_if)):
            argv = [
                "tc",
                *ns,
                "qdisc",
                "del" if rate_kbit is None else "replace",
                "dev",
                dev,
                "root",
            ]
            if rate_kbit is not None:
                argv += ["tbf", "rate", f"{rate_kbit}kbit", "burst", "8kb", "latency", "400ms"]
            subprocess.run(argv, capture_output=True, check=False)

    def destroy(self) -> None:
        if self.up:
            subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, check=False)
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
            self.up = False


class ChaosBroker(Broker):
    """A Broker with a second listener on the veth's host address (the namespace's route)."""

    def __init__(self, work_dir: Path, extra_host: str | None) -> None:
        super().__init__(work_dir, save_on_change=True)
        self.extra_host = extra_host

    def _mosquitto_conf(self) -> str:
        conf = super()._mosquitto_conf()
        if self.extra_host is None:
            return conf
        return conf + f"listener {self.port} {self.extra_host}\n"


def http_get(url: str, timeout: float = 2.0, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def http_post(url: str, body: Any, token: str | None, timeout: float = 10.0) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


@dataclass
class Part:
    """One restartable process. `url` is where its HTTP API answers (from the host)."""

    name: str
    argv: list[str]
    log_path: Path
    url: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    expected_down: bool = False
    starts: int = 0

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                cwd=REPO,
            )
        self.starts += 1
        self.expected_down = False

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL, as a power cut would; the harness restarts it."""
        self.expected_down = True
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def exited(self) -> int | None:
        """The exit code if it stopped although the harness did not stop it."""
        if self.proc is None or self.expected_down:
            return None
        return self.proc.poll()

    def stop(self) -> None:
        self.expected_down = True
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGCONT)  # a SIGSTOPped coordinator must hear the SIGTERM
        self.signal(signal.SIGTERM)
        wait_or_kill(self.proc, 15)

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def _public_b64(key_path: Path) -> str:
    from dgdm.sync.crypto import load_private_key, raw_public

    return base64.b64encode(raw_public(load_private_key(key_path))).decode()


@dataclass
class Agent:
    index: int
    device_id: str
    part: Part
    data_dir: Path
    token: str | None
    local_url: str  # where the load generator reaches it (inside the namespace for agent 0)
    loader: Part | None = None


class Rig:
    """Every part of one run, started in dependency order, stopped in reverse by pid."""

    def __init__(self, root: Path, *, clock: bool = True) -> None:
        self.root = root
        self.clock = clock
        self.netns: Netns | None = None
        self.broker: ChaosBroker | None = None
        self.pg: Any = None
        self.store_url = ""
        self.coordinators: list[Part] = []
        self.agents: list[Agent] = []
        self.mounts: list[Path] = []
        self.clock_file = root / "faketime"
        self.env: dict[str, str] = {}

    # -- start ------------------------------------------------------------------------------

    def start(self) -> Rig:
        self.netns = Netns().create()
        self._start_pg()
        self.broker = ChaosBroker(self.root / "broker", self.netns.host_ip).start()
        from dgdm.sync.crypto import generate_keypair

        keys = self.root / "keys"
        coord_key, _, coord_pub = generate_keypair(keys, name="coordinator")
        configs = [self._coordinator_config(i, coord_key) for i in range(REPLICAS)]
        devices = [(f"chaos-a{i}", generate_keypair(keys, name=f"a{i}")[0]) for i in range(AGENTS)]
        self._enrol(configs[0], [(d, _public_b64(k)) for d, k in devices])
        for i, (config, port) in enumerate(configs):
            argv = [sys.executable, "-m", "dgdm.agent", "coordinator", "--config", str(config)]
            part = Part(f"coord{i}", argv, self.root / f"coord{i}.log", f"http://127.0.0.1:{port}")
            part.env = dict(self.env)
            part.start()
            self.coordinators.append(part)
        for i, (device_id, key) in enumerate(devices):
            self.agents.append(self._agent(i, device_id, key, coord_pub))
        for part in self.parts():
            self.wait_healthy(part, 60)
        return self

    def _start_pg(self) -> None:
        from dgdm.sync.pgcluster import PgCluster, find_bin_dir

        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise Unavailable("no PostgreSQL binaries (initdb, pg_ctl): apt-get install postgresql")
        try:
            import psycopg  # noqa: F401
        except ImportError as exc:
            raise Unavailable("psycopg is not installed (pip install '.[test]')") from exc
        self.pg = PgCluster(bin_dir).init().start()
        self.store_url = self.pg.url(self.pg.create_database("chaos"))
        self.env[PG_PASSWORD_ENV] = self.pg.password

    def _coordinator_config(self, index: int, key: Path) -> tuple[Path, int]:
        assert self.broker is not None
        path, port = self.root / f"coord{index}.toml", free_port()
        sections = {
            "coordinator": {
                "id": f"chaos-replica-{index}",
                "data_dir": str(self.root / f"coord{index}"),
                "private_key": str(key),
            },
            "mqtt": {
                "broker_url": self.broker.url,
                "client_id": f"chaos-replica-{index}",
                "session_expiry_s": 15,
            },
            "http": {"port": port, "token": TOKEN},
            "store": {"url": self.store_url, "password": f"env:{PG_PASSWORD_ENV}"},
        }
        path.write_text(toml_text(sections))
        return path, port

    def _enrol(self, config: tuple[Path, int], devices: list[tuple[str, str]]) -> None:
        from dgdm.sync.coordinator.config import load_config
        from dgdm.sync.coordinator.stores import open_store

        store = open_store(load_config(config[0]), env={**os.environ, **self.env})
        try:
            for device_id, public in devices:
                store.add_device(device_id, public)
        finally:
            store.close()

    def _agent(self, index: int, device_id: str, key: Path, coord_pub: str) -> Agent:
        assert self.broker is not None
        assert self.netns is not None
        workdir = self.root / f"agent{index}"
        workdir.mkdir()
        data_dir = workdir / "data"
        if index == DISK_AGENT:
            self._mount_tmpfs(data_dir)
        broker_url, bind, host, token = self.broker.url, "127.0.0.1", "127.0.0.1", None
        prefix: list[str] = []
        env: dict[str, str] = {}
        if index == NETNS_AGENT:
            broker_url = f"mqtt://{self.netns.host_ip}:{self.broker.port}"
            bind, host, token, prefix = "0.0.0.0", self.netns.ns_ip, TOKEN, self.netns.prefix()
        if index == CLOCK_AGENT and self.clock:
            env = self._faketime_env()
        port = free_port()
        sections = {
            "device": {"id": device_id, "data_dir": str(data_dir), "private_key": str(key)},
            "http": {"bind": bind, "port": port, **({"token": token} if token else {})},
            "sync": {
                "broker_url": broker_url,
                "coordinator_public_key": coord_pub,
                "receipt_timeout_s": 10.0,
                "offline_alert_s": 2.0,
            },
            "telemetry": {"interval_s": 1.0, "batch_s": 2.0},
            "kernels": {"backend": "numpy"},
            # Always "low" (1 PiB wanted): an alert every repeat_s, the steady alert load.
            "alerts": {"disk_min_free_bytes": 2**50, "repeat_s": 5.0},
        }
        config = workdir / "agent.toml"
        config.write_text(toml_text(sections))
        argv = [*prefix, sys.executable, "-m", "dgdm.agent", "agent", "--config", str(config)]
        part = Part(f"agent{index}", argv, workdir / "agent.log", f"http://{host}:{port}", env)
        part.start()
        local = f"http://127.0.0.1:{port}"
        return Agent(index, device_id, part, data_dir, token, local)

    def _faketime_env(self) -> dict[str, str]:
        if not FAKETIME_LIB.exists():
            raise Unavailable(f"{FAKETIME_LIB} is missing: apt-get install faketime")
        self.clock_file.write_text("+0\n")
        # Monotonic time stays real (a wall-clock step does not move it). The file is read
        # again at most once a second (FAKETIME_NO_CACHE, reading it on every clock call,
        # slows the agent's start-up to tens of seconds), so a step lands within a second.
        return {
            "LD_PRELOAD": str(FAKETIME_LIB),
            "FAKETIME_TIMESTAMP_FILE": str(self.clock_file),
            "FAKETIME_CACHE_DURATION": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }

    def _mount_tmpfs(self, mount_point: Path) -> None:
        mount_point.mkdir()
        done = subprocess.run(
            [
                "mount",
                "-t",
                "tmpfs",
                "-o",
                f"size={DISK_SIZE},mode=0700",
                "tmpfs",
                str(mount_point),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise Unavailable(f"cannot mount a tmpfs: {done.stderr.strip()}")
        self.mounts.append(mount_point)

    def start_loaders(self, rate: float) -> None:
        assert self.netns is not None
        for agent in self.agents:
            prefix = self.netns.prefix() if agent.index == NETNS_AGENT else []
            out = self.root / f"accepted-a{agent.index}.jsonl"
            argv = [
                *prefix, sys.executable, "-m", "tests.chaos.loader",
                agent.local_url, str(out), str(rate), agent.token or "",
            ]  # fmt: skip
            agent.loader = Part(
                f"loader{agent.index}", argv, self.root / f"loader{agent.index}.log"
            )
            agent.loader.start()

    # -- health -----------------------------------------------------------------------------

    def parts(self) -> list[Part]:
        return [*self.coordinators, *(a.part for a in self.agents)]

    def healthy(self, name: str) -> bool:
        """Whether `name` (agentN, coordN, broker, pg) answers its health check now."""
        if name in ("broker", "pg"):
            port = self.broker.port if name == "broker" and self.broker else self.pg.port
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return True
            return False
        part = self.part(name)
        assert part.url is not None
        with contextlib.suppress(OSError):
            return http_get(part.url + "/healthz", timeout=1.5)[0] == 200
        return False

    def part(self, name: str) -> Part:
        return next(p for p in self.parts() if p.name == name)

    def wait_healthy(self, part: Part, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.healthy(part.name):
            if part.proc is not None and part.proc.poll() is not None:
                raise RuntimeError(f"{part.name} exited at start-up: {part.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{part.name} not healthy in {timeout_s} s: {part.log_tail()}")
            time.sleep(0.2)

    # -- stop -------------------------------------------------------------------------------

    def stop(self) -> None:
        for agent in self.agents:
            if agent.loader is not None:
                agent.loader.stop()
        for part in reversed(self.parts()):
            part.stop()
        if self.broker is not None:
            self.broker.stop()
        if self.pg is not None:
            self.pg.destroy()
        if self.netns is not None:
            self.netns.destroy()
        for mount_point in reversed(self.mounts):
            if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
                subprocess.run(["umount", "--lazy", str(mount_point)], check=False)
