"""`dgdm bench fleet`: N simulated devices, K coordinator replicas, one store, one broker.

Everything real and on loopback: a private mosquitto (`Broker`, never the system's 1883),
K `python -m dgdm.agent coordinator` processes sharing the traffic through `$share/dgdm/...`
and one store (a SQLite file or a private PostgreSQL cluster, `pgcluster.PgCluster`), and
worker processes each running many devices (`fleet_devices`: real Outbox + DeviceLink,
own key, own MQTT connection, enrolled in the store).

`--rate` is the whole fleet's telemetry in msg/s (each device sends rate/N). Figures:
devices connected; messages accepted (enqueued) / stored (rows) / receipted (gone from the
outboxes); ingest msg/s (rows / (last received_ms - first created_ms): offer more than the
store takes to measure its ceiling); latency enqueue -> stored (the row's received_ms minus
its created_ms, both stamped on this machine's clock); each replica's share of
`dgdm_messages_in_total` and CPU seconds per 1,000 of its messages; RSS per device.
`--kill-one-at T` SIGKILLs replica 0 at T s: lost (accepted, never stored), duplicate rows
and the takeover time (after it, no message waits more than max(1 s, 3 x the p99 before)).
`--noisy-neighbour` adds one device flooding sealed telemetry from a raw socket
(`dgdm.sync.flood`) and reports the others' latency, coordinator RSS growth, API p99 and the
flooder's stored rows against its quota.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgdm.sync.child_procs import terminate, toml_text

TOKEN = secrets.token_urlsafe(16)  # the replicas' API token, new for every bench process
DEVICES_PER_WORKER = 1000
FLOODER = "flood-0"
PG_PASSWORD_ENV = "DGDM_BENCH_FLEET_PG_PASSWORD"  # noqa: S105 - a variable name, not a secret
TELEMETRY = 2  # Kind.TELEMETRY in the store's kind column


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, default=1000, help="simulated devices")
    parser.add_argument("--coordinators", type=int, default=1, help="coordinator replicas")
    parser.add_argument("--rate", type=float, default=500.0, help="fleet telemetry msg/s")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of traffic")
    parser.add_argument(
        "--store",
        default="sqlite",
        choices=("sqlite", "postgres", "both"),
        help="the shared store; both: one run on each, PostgreSQL's rate / SQLite's",
    )
    parser.add_argument("--kill-one-at", type=float, default=None, help="SIGKILL replica 0 at T s")
    parser.add_argument("--noisy-neighbour", action="store_true", help="one device floods")
    parser.add_argument("--workers", type=int, default=0, help="device processes (0: auto)")
    parser.add_argument(
        "--session-expiry",
        type=int,
        default=5,
        help="replicas' MQTT session expiry s: a killed replica's queued share waits this long",
    )
    parser.add_argument("--outbox-dir", default=None, help="device outboxes (default tmpfs)")
    parser.add_argument("--quick", action="store_true", help="20 devices, 5 s, 200 msg/s")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    if args.quick:
        args.devices, args.duration, args.rate = 20, 5.0, 200.0
    problem = _check(args)
    if problem:
        print(f"dgdm bench fleet: {problem}", file=sys.stderr)
        return 2
    _raise_fd_limit(args.devices)
    stores = ["sqlite", "postgres"] if args.store == "both" else [args.store]
    reports = [run(args, store) for store in stores]
    if args.store == "both":
        sqlite, postgres = (r["ingest_msg_s"] for r in reports)
        summary: dict[str, Any] = {"runs": reports, "postgres_over_sqlite": postgres / sqlite}
    else:
        summary = reports[0]
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for report in reports:
            print(format_report(report))
        if args.store == "both":
            print(f"PostgreSQL ingest / SQLite ingest: {summary['postgres_over_sqlite']:.0%}")
    return 0


def _check(args: argparse.Namespace) -> str | None:
    if args.devices < 1:
        return "--devices must be at least 1"
    if args.coordinators < 1:
        return "--coordinators must be at least 1"
    if args.rate <= 0 or args.duration <= 0:
        return "--rate and --duration must be positive"
    if args.kill_one_at is not None:
        if args.coordinators < 2:
            return "--kill-one-at needs --coordinators 2 or more (a survivor)"
        if not 0 < args.kill_one_at < args.duration:
            return "--kill-one-at must fall within --duration"
    return None


def _raise_fd_limit(devices: int) -> None:
    """Each device holds a socket and its outbox's SQLite files, and mosquitto (our child,
    inheriting the limit) one socket per device: raise the soft limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, min(hard, devices * 8 + 1024)) if hard != resource.RLIM_INFINITY else 65536
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# -- pure figures -----------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def takeover_s(accepted: list[tuple[int, int | None]], kill_ms: int, end_ms: int) -> float | None:
    """Seconds after the kill until the survivors carried everything: from then on no
    message created (until `end_ms`) waited more than max(1 s, 3 x the p99 before the kill).
    `accepted` is (created_ms, received_ms or None: never stored). None: no data either side."""
    before = [float(r - c) for c, r in accepted if c < kill_ms and r is not None]
    after = [(c, r) for c, r in accepted if kill_ms <= c <= end_ms]
    if not before or not after:
        return None
    limit = max(1000.0, 3 * (quantile(before, 0.99) or 0.0))
    slow = [c for c, r in after if r is None or r - c > limit]
    return (max(slow) - kill_ms) / 1000 if slow else 0.0


def ingest_rate(received_ms: list[int], start_ms: int, end_ms: int) -> float:
    """Rows stored per second within [start_ms, end_ms]: while the devices produce; with
    more offered than the store takes, this is its ceiling (the backlog drains later)."""
    inside = sum(1 for r in received_ms if start_ms <= r <= end_ms)
    return inside / max(0.001, (end_ms - start_ms) / 1000)


def metric_sum(text: str, name: str) -> float:
    """The sum of a Prometheus text exposition's samples named `name` (all label sets)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Replica:
    index: int
    proc: subprocess.Popen[bytes]
    port: int
    config: Path
    killed_at: float | None = None
    cpu_start: float = 0.0
    cpu_last: float = 0.0
    msgs_start: float = 0.0
    msgs_last: float = 0.0
    msgs_at_kill: float | None = None  # stored messages when a replica was killed
    rss_samples: list[int] = field(default_factory=list)

    def get(self, path: str, timeout: float = 10.0) -> bytes:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback http
            return bytes(resp.read())

    def sample(self) -> None:
        """CPU, RSS and stored messages now (kept as the last values once it is killed)."""
        import psutil

        if self.killed_at is not None:
            return
        with contextlib.suppress(psutil.Error, OSError):
            proc = psutil.Process(self.proc.pid)
            times = proc.cpu_times()
            rss = int(proc.memory_info().rss)
            msgs = metric_sum(self.get("/metrics").decode(), "dgdm_messages_in_total")
            self.cpu_last, self.msgs_last = times.user + times.system, msgs
            self.rss_samples.append(rss)


class Fleet:
    """The processes of one run, started in order and stopped by pid in reverse."""

    def __init__(self, root: Path, args: argparse.Namespace, store: str) -> None:
        self.root, self.args, self.store_kind = root, args, store
        self.procs: list[subprocess.Popen[bytes]] = []
        self.replicas: list[Replica] = []
        self.pg: Any = None
        self.store_url: str | None = None
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def stop(self) -> None:
        for proc in reversed(self.procs):
            terminate(proc, 20)
        if self.pg is not None:
            self.pg.destroy()

    def spawn(self, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        with (self.root / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.procs.append(proc)
        return proc


@contextlib.contextmanager
def _fleet(root: Path, args: argparse.Namespace, store: str) -> Iterator[Fleet]:
    fleet = Fleet(root, args, store)
    try:
        yield fleet
    finally:
        fleet.stop()


def run(args: argparse.Namespace, store: str) -> dict[str, Any]:
    from dgdm.sync.broker import Broker

    with (
        tempfile.TemporaryDirectory(prefix="dgdm-bench-fleet-") as tmp,
        tempfile.TemporaryDirectory(
            prefix="dgdm-fleet-outboxes-", dir=_outbox_base(args.outbox_dir)
        ) as outboxes,
        Broker(Path(tmp) / "broker", max_queued_messages=100_000) as broker,
        _fleet(Path(tmp), args, store) as fleet,
    ):
        return _run(fleet, broker, Path(outboxes))


def _outbox_base(given: str | None) -> str:
    from dgdm.sync.fleet_devices import outbox_root

    return str(outbox_root(given))


def _per_device_rate(args: argparse.Namespace) -> float:
    return float(args.rate) / args.devices


def _telemetry_quota(args: argparse.Namespace) -> float:
    # Honest devices stay far below it (the default 20/s unless the bench offers more).
    return max(20.0, 2 * _per_device_rate(args))


def _run(fleet: Fleet, broker: Any, outboxes: Path) -> dict[str, Any]:
    import psutil

    from dgdm.sync.crypto import generate_keypair

    args, root = fleet.args, fleet.root
    keys = root / "keys"
    coord_key, _, coord_pub = generate_keypair(keys, name="coordinator")
    if fleet.store_kind == "postgres":
        _start_postgres(fleet)
    configs = [_write_config(fleet, broker.url, coord_key, i) for i in range(args.coordinators)]
    names = [f"sim-{i:05d}" for i in range(args.devices)]
    devices = [(n, str(generate_keypair(keys, name=n)[0])) for n in names]
    enrol = [(n, _public(keys / f"{n}.key")) for n in names]
    flood_key = None
    if args.noisy_neighbour:
        flood_key = generate_keypair(keys, name=FLOODER)[0]
        enrol.append((FLOODER, _public(flood_key)))
    _enrol(configs[0][0], enrol, fleet.env)
    t_start = time.monotonic()
    fleet.replicas = [_start_replica(fleet, c, i) for i, c in enumerate(configs)]
    workers, pipes = _start_workers(args, broker.url, coord_pub, devices, outboxes)
    ready = [p.recv() for p in pipes]
    connected = sum(r[1] for r in ready)
    device_rss = sum(r[3] - r[2] for r in ready)
    broker_rss = psutil.Process(broker.pid).memory_info().rss
    setup_s = time.monotonic() - t_start
    for rep in fleet.replicas:
        rep.sample()
        rep.cpu_start, rep.msgs_start = rep.cpu_last, rep.msgs_last
        rep.rss_samples = rep.rss_samples[-1:]
    idle_rss = [rep.rss_samples[-1] if rep.rss_samples else 0 for rep in fleet.replicas]
    go_wall = time.time() + 1.0
    for p in pipes:
        p.send(("go", go_wall, args.duration, _per_device_rate(args)))
    flood = _start_flood(fleet, broker, flood_key, coord_pub, go_wall) if flood_key else None
    api = _ApiProbe(fleet.replicas[0], names[0]) if args.noisy_neighbour else None
    sent = _traffic(fleet, pipes, go_wall, api)
    drained = [p.recv() for p in pipes]
    for rep in fleet.replicas:
        rep.sample()
    for p in pipes:
        p.send(("stop",))
    for w in workers:
        w.join(60)
    flood_figures = _finish_flood(flood)
    rows = _read_rows(fleet)
    return _report(
        fleet,
        sent=sent,
        rows=rows,
        connected=connected,
        pending=sum(d[1] for d in drained),
        resent=sum(d[2] for d in drained),
        device_rss=device_rss,
        broker_rss=broker_rss,
        idle_rss=idle_rss,
        setup_s=setup_s,
        go_wall=go_wall,
        flood=flood_figures,
        api=api,
    )


def _public(key_path: Path) -> str:
    import base64

    from dgdm.sync.crypto import load_private_key, raw_public

    return base64.b64encode(raw_public(load_private_key(key_path))).decode()


def _start_postgres(fleet: Fleet) -> None:
    from dgdm.sync.pgcluster import PgCluster, find_bin_dir

    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise SystemExit("dgdm bench fleet: --store postgres needs initdb/pg_ctl (postgresql)")
    # Room for every replica's pool, the API's and the bench's own reads.
    fleet.pg = PgCluster(bin_dir).init()
    fleet.pg.start()
    database = fleet.pg.create_database("fleet")
    fleet.store_url = fleet.pg.url(database)
    fleet.env[PG_PASSWORD_ENV] = fleet.pg.password


def _write_config(fleet: Fleet, broker_url: str, coord_key: Path, index: int) -> tuple[Path, int]:
    from dgdm.sync.broker import free_port

    root = fleet.root
    store: dict[str, Any] = {"url": str(root / "store.db")}
    if fleet.store_url is not None:
        store = {"url": fleet.store_url, "password": f"env:{PG_PASSWORD_ENV}"}
    path, port = root / f"coordinator-{index}.toml", free_port()
    path.write_text(
        toml_text(
            {
                "coordinator": {
                    "id": f"replica-{index}",
                    "data_dir": str(root / f"replica-{index}"),
                    "private_key": str(coord_key),
                },
                "mqtt": {
                    "broker_url": broker_url,
                    "client_id": f"bench-replica-{index}",
                    "session_expiry_s": fleet.args.session_expiry,
                },
                "http": {"port": port, "token": TOKEN},
                "store": store,
                "ingest": {"telemetry_per_s": _telemetry_quota(fleet.args)},
            }
        )
    )
    return path, port


def _enrol(config: Path, devices: list[tuple[str, str]], env: dict[str, str]) -> None:
    """Enrol every device in the shared store (what `devices add` does, in one process)."""
    from dgdm.sync.coordinator.config import load_config
    from dgdm.sync.coordinator.stores import open_store

    store = open_store(load_config(config), env=env)
    try:
        for device_id, public in devices:
            store.add_device(device_id, public)
    finally:
        store.close()


def _start_replica(fleet: Fleet, config: tuple[Path, int], index: int) -> Replica:
    path, port = config
    argv = [sys.executable, "-m", "dgdm.agent", "coordinator", "--config", str(path)]
    proc = fleet.spawn(argv, f"replica-{index}")
    replica = Replica(index, proc, port, path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = (fleet.root / f"replica-{index}.log").read_text(errors="replace")
            raise SystemExit(f"dgdm bench fleet: replica {index} exited: {log[-2000:]}")
        # 200 once its store and broker answer (a 503 is an HTTPError, an OSError: wait on).
        with contextlib.suppress(OSError):
            replica.get("/healthz", timeout=2)
            return replica
        time.sleep(0.1)
    raise SystemExit(f"dgdm bench fleet: replica {index} was not healthy within 60 s")


def _start_workers(
    args: argparse.Namespace,
    broker_url: str,
    coord_pub: str,
    devices: list[tuple[str, str]],
    outboxes: Path,
) -> tuple[list[Any], list[Any]]:
    from dgdm.sync.fleet_devices import WorkerSpec, run_worker

    count = args.workers or math.ceil(len(devices) / DEVICES_PER_WORKER)
    ctx = mp.get_context("spawn")
    workers, pipes = [], []
    # After a kill, what the broker had queued for the dead replica is dropped when its
    # session expires and resent by the devices at the latest after their 60 s receipt
    # timeout (DeviceLink's default): wait for that, so "lost" means lost.
    drain_s = 30.0 + (60.0 + args.session_expiry if args.kill_one_at is not None else 0.0)
    for i in range(count):
        share = devices[i::count]
        if not share:
            continue
        parent, child = ctx.Pipe()
        spec = WorkerSpec(broker_url, coord_pub, share, str(outboxes), drain_s)
        # daemon: a bench stopped early takes its workers with it
        proc = ctx.Process(
            target=run_worker, args=(spec, child), name=f"fleet-worker-{i}", daemon=True
        )
        proc.start()
        child.close()
        workers.append(proc)
        pipes.append(parent)
    return workers, pipes


def _traffic(
    fleet: Fleet, pipes: list[Any], go_wall: float, api: _ApiProbe | None
) -> dict[str, list[tuple[int, int]]]:
    """Sample the replicas each second (and kill one on time) until every worker sent all."""
    kill_at = fleet.args.kill_one_at
    sent: dict[str, list[tuple[int, int]]] = {}
    waiting = list(pipes)
    if api is not None:
        api.start()
    try:
        while waiting:
            now = time.time()
            victim = fleet.replicas[0]
            if kill_at is not None and victim.killed_at is None and now >= go_wall + kill_at:
                for rep in fleet.replicas:
                    rep.sample()
                    rep.msgs_at_kill = rep.msgs_last
                os.kill(victim.proc.pid, signal.SIGKILL)
                victim.killed_at = time.time()
            for rep in fleet.replicas:
                rep.sample()
            for p in list(waiting):
                if p.poll(0.2):
                    sent.update(p.recv()[1])
                    waiting.remove(p)
    finally:
        if api is not None:
            api.stop()
    return sent


class _ApiProbe(threading.Thread):
    """GET /devices/{id}/results on a replica every 50 ms, as an operator's dashboard would."""

    def __init__(self, replica: Replica, device_id: str) -> None:
        super().__init__(daemon=True)
        self.replica, self.device_id = replica, device_id
        self.ms: list[float] = []
        self.errors = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            t0 = time.monotonic()
            try:
                self.replica.get(f"/devices/{self.device_id}/results?since=0&limit=100")
                self.ms.append((time.monotonic() - t0) * 1000)
            except OSError:
                self.errors += 1
            self._stop_event.wait(0.05)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(30)


@dataclass
class _Flood:
    proc: subprocess.Popen[bytes]
    out: Path
    started_wall: float


def _start_flood(fleet: Fleet, broker: Any, key: Path, coord_pub: str, go_wall: float) -> _Flood:
    time.sleep(max(0.0, go_wall - time.time()))
    out = fleet.root / "flood.json"
    argv = [
        sys.executable,
        "-m",
        "dgdm.sync.flood",
        "127.0.0.1",
        str(broker.port),
        FLOODER,
        str(key),
        coord_pub,
        str(fleet.args.duration),
        str(out),
    ]
    return _Flood(fleet.spawn(argv, "flooder"), out, time.time())


def _finish_flood(flood: _Flood | None) -> dict[str, Any] | None:
    if flood is None:
        return None
    flood.proc.wait(60)
    figures = json.loads(flood.out.read_text())
    return {**figures, "started_wall": flood.started_wall}


def _read_rows(fleet: Fleet) -> list[tuple[str, int, int, int]]:
    """(device_id, seq, created_ms, received_ms) of every stored telemetry row."""
    sql = "SELECT device_id, seq, created_ms, received_ms FROM messages WHERE kind = 2"
    if fleet.pg is None:
        import sqlite3

        with contextlib.closing(sqlite3.connect(fleet.root / "store.db")) as db:
            return [tuple(r) for r in db.execute(sql)]
    import psycopg

    assert fleet.store_url is not None
    with psycopg.connect(fleet.store_url, password=fleet.pg.password) as conn:
        return [tuple(r) for r in conn.execute(sql)]


# -- the report -----------------------------------------------------------------------------------


def _report(
    fleet: Fleet,
    *,
    sent: dict[str, list[tuple[int, int]]],
    rows: list[tuple[str, int, int, int]],
    connected: int,
    pending: int,
    resent: int,
    device_rss: int,
    broker_rss: int,
    idle_rss: list[int],
    setup_s: float,
    go_wall: float,
    flood: dict[str, Any] | None,
    api: _ApiProbe | None,
) -> dict[str, Any]:
    args = fleet.args
    honest = [r for r in rows if r[0] != FLOODER]
    stored_at = {(d, s): (c, r) for d, s, c, r in honest}
    stored_keys = set(stored_at)
    accepted = sum(len(v) for v in sent.values())
    lost = sum(1 for d, seqs in sent.items() for s, _ in seqs if (d, s) not in stored_keys)
    latencies = [float(r - c) for _, _, c, r in honest]
    go_ms, end_ms = int(go_wall * 1000), int((go_wall + args.duration) * 1000)
    messages = [rep.msgs_last - rep.msgs_start for rep in fleet.replicas]
    total_in = sum(messages) or 1.0
    replicas = []
    for rep, msgs, idle in zip(fleet.replicas, messages, idle_rss, strict=True):
        cpu = rep.cpu_last - rep.cpu_start
        replicas.append(
            {
                "replica": rep.index,
                "messages_in": int(msgs),
                "share": round(msgs / total_in, 3),
                "cpu_s": round(cpu, 2),
                "cpu_s_per_1000": round(1000 * cpu / msgs, 3) if msgs else None,
                "rss_idle_mb": round(idle / 2**20, 1),
                "rss_peak_mb": round(max(rep.rss_samples, default=idle) / 2**20, 1),
                "killed": rep.killed_at is not None,
            }
        )
    report: dict[str, Any] = {
        "store": fleet.store_kind,
        "devices": args.devices,
        "coordinators": args.coordinators,
        "offered_msg_s": args.rate,
        "duration_s": args.duration,
        "setup_s": round(setup_s, 1),
        "devices_connected": connected,
        "accepted": accepted,
        "stored": len(stored_keys),
        "receipted": accepted - pending,
        "still_queued": pending,
        "resent": resent,
        # Not stored yet but still in an outbox is late, not lost (it is resent until stored).
        "lost": max(0, lost - pending),
        "duplicate_rows": len(honest) - len(stored_keys),
        # From 1 s in (the first messages' own latency) to the end of production.
        "ingest_msg_s": round(ingest_rate([r[3] for r in honest], go_ms + 1000, end_ms), 1),
        "latency_ms": {
            "p50": quantile(latencies, 0.5),
            "p99": quantile(latencies, 0.99),
            "max": max(latencies, default=None),
        },
        "replicas": replicas,
        "device_rss_kib": round(device_rss / max(1, connected) / 1024, 1),
        "broker_rss_kib_per_device": round(broker_rss / max(1, connected) / 1024, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    killed = fleet.replicas[0].killed_at
    if killed is not None:
        pairs: list[tuple[int, int | None]] = [
            stored_at.get((d, s), (t, None)) for d, seqs in sent.items() for s, t in seqs
        ]
        at_kill = [(rep.msgs_at_kill or 0.0) - rep.msgs_start for rep in fleet.replicas]
        report["kill"] = {
            "at_s": round(killed - go_wall, 2),
            # The split while every replica ran (the killed one's share ends at the kill).
            "shares_before": [round(m / (sum(at_kill) or 1.0), 3) for m in at_kill],
            "takeover_s": takeover_s(pairs, int(killed * 1000), end_ms),
            "session_expiry_s": args.session_expiry,
        }
    if flood is not None and api is not None:
        report["noisy_neighbour"] = _flood_figures(
            fleet, rows=rows, honest=honest, flood=flood, api=api, idle_rss=idle_rss
        )
    return report


def _flood_figures(
    fleet: Fleet,
    *,
    rows: list[tuple[str, int, int, int]],
    honest: list[tuple[str, int, int, int]],
    flood: dict[str, Any],
    api: _ApiProbe,
    idle_rss: list[int],
) -> dict[str, Any]:
    start_ms = int(flood["started_wall"] * 1000)
    end_ms = start_ms + int(flood["seconds"] * 1000)
    during = [float(r - c) for _, _, c, r in honest if start_ms <= c <= end_ms]
    quota_per_s = _telemetry_quota(fleet.args)
    burst_s = 30.0  # IngestSection.burst_s's default, which the bench does not change
    growth = [
        (max(rep.rss_samples, default=idle) - idle) / 2**20
        for rep, idle in zip(fleet.replicas, idle_rss, strict=True)
    ]
    return {
        "flood_sent": flood["sent"],
        "flood_msg_s": round(flood["sent"] / flood["seconds"]),
        "others_latency_ms": {
            "p50": quantile(during, 0.5),
            "p95": quantile(during, 0.95),
            "max": max(during, default=None),
        },
        "coordinator_rss_growth_mb": [round(g, 1) for g in growth],
        "api_p50_ms": _round(quantile(api.ms, 0.5)),
        "api_p99_ms": _round(quantile(api.ms, 0.99)),
        "api_requests": len(api.ms),
        "api_errors": api.errors,
        "flooder_stored": sum(1 for r in rows if r[0] == FLOODER),
        "flooder_quota": int(quota_per_s * (burst_s + flood["seconds"])),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def format_report(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    lines = [
        f"== dgdm bench fleet: {r['devices']} devices, {r['coordinators']} replica(s), "
        f"store {r['store']}, {r['offered_msg_s']:g} msg/s offered for {r['duration_s']:g} s",
        f"devices connected        {r['devices_connected']} (setup {r['setup_s']} s)",
        f"accepted/stored/receipted {r['accepted']} / {r['stored']} / {r['receipted']}"
        f" (still queued {r['still_queued']}, resent {r['resent']})",
        f"lost / duplicate rows    {r['lost']} / {r['duplicate_rows']}",
        f"ingest                   {r['ingest_msg_s']} msg/s",
        f"latency enqueue->stored  p50 {lat['p50']} ms, p99 {lat['p99']} ms, max {lat['max']} ms",
        f"RSS per device           {r['device_rss_kib']} KiB (devices), "
        f"{r['broker_rss_kib_per_device']} KiB (mosquitto)",
        "replica  share  messages  cpu_s  cpu_s/1000  rss_idle_mb  rss_peak_mb",
    ]
    for rep in r["replicas"]:
        lines.append(
            f"{rep['replica']:>7}{' (killed)' if rep['killed'] else ''}  {rep['share']:.1%}"
            f"  {rep['messages_in']:>8}  {rep['cpu_s']:>5}  {rep['cpu_s_per_1000']}"
            f"  {rep['rss_idle_mb']:>11}  {rep['rss_peak_mb']:>11}"
        )
    if "kill" in r:
        k = r["kill"]
        lines.append(
            f"killed replica 0 at {k['at_s']} s (shares until then {k['shares_before']}): "
            f"survivors carried all traffic after {k['takeover_s']} s "
            f"(session expiry {k['session_expiry_s']} s)"
        )
    if "noisy_neighbour" in r:
        n = r["noisy_neighbour"]
        o = n["others_latency_ms"]
        lines += [
            f"flooder                  {n['flood_sent']} sent ({n['flood_msg_s']} msg/s), "
            f"stored {n['flooder_stored']} (quota {n['flooder_quota']})",
            f"others during the flood  p50 {o['p50']} ms, p95 {o['p95']} ms, max {o['max']} ms",
            f"coordinator RSS growth   {n['coordinator_rss_growth_mb']} MB",
            f"API p50/p99              {n['api_p50_ms']} / {n['api_p99_ms']} ms "
            f"({n['api_requests']} requests, {n['api_errors']} errors)",
        ]
    lines.append(f"load average             {r['load_average']}")
    return "\n".join(lines)
