"""Interop and broker-restart recovery: an agent link and a coordinator through real brokers.

Each broker (mosquitto in MQTT 5 and 3.1.1, amqtt and aedes in 3.1.1, all without
persistence across a SIGKILL) carries 200 results and a ping; then it is SIGKILLed in the
middle of 200 more and restarted on the same port 5 s later. Each client reaches the broker
through its own `Gate` (a TCP forwarder on loopback), so the test decides who reconnects
first. Pass: all 400 stored exactly once within 15 s of both being connected, with the
default `receipt_timeout_s` (60 s), and a command answered after the recovery.

The default run (marker `interop`) is a representative subset; `-m interop_full` runs the
whole matrix (broker x protocol x wire x reconnect order).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dgdm.sync.broker import Broker, free_port, mosquitto_path
from dgdm.sync.coordinator.service import Coordinator
from dgdm.sync.envelope import Kind

from .conftest import eventually

INTEROP_DIR = Path(__file__).resolve().parent.parent / "interop"
AEDES_VERSION = "1.2.0"
FIRST, SECOND = 200, 200
DOWN_S = 5.0
RECOVERY_S = 15.0
WAIT_S = 90.0  # longer than receipt_timeout_s: a failure says how long recovery really took
HEAD_START_S = 1.0  # how long the first side is connected alone
RECONNECT_S = 75.0  # the coordinator reconnects with the default backoff (up to 60 s)


class Gate:
    """A TCP forwarder to the broker that the test opens and shuts: while shut, connections
    are accepted and closed at once, as if the broker were still down for this client."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.open = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    async def start(self) -> Gate:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def shut(self) -> None:
        self.open = False
        for writer in list(self._writers):
            writer.close()

    async def stop(self) -> None:
        self.shut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._writers.difference_update((writer, up_writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.CancelledError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


class AedesBroker:
    """aedes (npm) in memory, run by tests/interop/aedes_broker.mjs; same kill/start as Broker."""

    mqtt_version = "3.1.1"

    def __init__(self, work_dir: Path, modules: Path) -> None:
        self.work_dir = work_dir
        self.modules = modules
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AedesBroker:
        script = INTEROP_DIR / "aedes_broker.mjs"
        argv = ["node", str(script), str(self.port), str(self.modules)]
        with (self.work_dir / "aedes.log").open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"aedes exited: {(self.work_dir / 'aedes.log').read_text()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return self
            time.sleep(0.05)
        raise RuntimeError("aedes did not listen")

    def kill(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            self.proc = None

    stop = kill


def _aedes_modules(cache: pytest.Cache) -> Path:
    """aedes installed with npm into a cache dir once; skip (with npm's reason) if it cannot be."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("aedes: node/npm are not installed")
    prefix = Path(cache.mkdir("aedes-npm"))
    if (prefix / "node_modules" / "aedes" / "aedes.js").exists():
        return prefix / "node_modules"
    done = subprocess.run(
        [
            "npm",
            "install",
            "--no-audit",
            "--no-fund",
            "--prefix",
            str(prefix),
            f"aedes@{AEDES_VERSION}",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"aedes: npm install failed: {done.stderr.strip()[-300:]}")
    return prefix / "node_modules"


@dataclasses.dataclass(frozen=True)
class Case:
    broker: str  # mosquitto | amqtt | aedes
    version: str  # "5" | "3.1.1"
    wire: str  # lean | paho
    first: str  # agent | coordinator: who reconnects first after the restart

    @property
    def id(self) -> str:
        return f"{self.broker}-{self.version}-{self.wire}-{self.first}-first"


def _matrix() -> list[Case]:
    brokers = [("mosquitto", "5"), ("mosquitto", "3.1.1"), ("amqtt", "3.1.1"), ("aedes", "3.1.1")]
    return [
        Case(b, v, w, f)
        for b, v in brokers
        for w in ("lean", "paho")
        for f in ("agent", "coordinator")
    ]


# The default subset: every broker and protocol once, both wires and both orders covered.
DEFAULT = {
    Case("mosquitto", "5", "lean", "agent"),
    Case("mosquitto", "3.1.1", "paho", "coordinator"),
    Case("amqtt", "3.1.1", "lean", "agent"),
    Case("aedes", "3.1.1", "paho", "agent"),
}


def _params() -> Iterator[Any]:
    for case in _matrix():
        marks = [pytest.mark.interop] if case in DEFAULT else [pytest.mark.interop_full]
        yield pytest.param(case, id=case.id, marks=marks)


@pytest.fixture
def broker_for(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    started: list[Any] = []

    def make(case: Case) -> Any:
        if case.broker == "aedes":
            broker: Any = AedesBroker(tmp_path, _aedes_modules(request.config.cache))
        elif case.broker == "mosquitto":
            if mosquitto_path() is None:
                pytest.skip("mosquitto is not installed")
            broker = Broker(tmp_path / "mosquitto", engine="mosquitto")
        else:
            pytest.importorskip("amqtt", reason="amqtt (the demo extra) is not installed")
            broker = Broker(tmp_path / "amqtt", engine="amqtt")
        started.append(broker)
        return broker.start()

    yield make
    for broker in started:
        broker.stop()


async def _pong(seq: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"pong": body.get("cmd") == "ping"}


@pytest.mark.parametrize("case", list(_params()))
async def test_broker_restart_recovers_in_seconds(case: Case, broker_for, sync_rig) -> None:
    broker = broker_for(case)
    agent_gate = await Gate(broker.port).start()
    coord_gate = await Gate(broker.port).start()
    agent_gate.open = coord_gate.open = True
    try:
        await _scenario(case, broker, agent_gate, coord_gate, sync_rig)
    finally:
        await agent_gate.stop()
        await coord_gate.stop()


async def _scenario(case: Case, broker: Any, agent_gate: Gate, coord_gate: Gate, sync_rig) -> None:
    rig = sync_rig(types.SimpleNamespace(url=agent_gate.url, tls=None))
    wire = {"mqtt": {"mqtt_version": case.version, **_wire(case.wire)}}
    device = rig.device("d", on_command=_pong, **wire)
    config = rig.config(mqtt_version=case.version)
    mqtt = dataclasses.replace(config.mqtt, broker_url=coord_gate.url, **_wire(case.wire))
    coordinator = Coordinator(dataclasses.replace(config, mqtt=mqtt))
    await coordinator.start(http=False)
    rig.coordinator = coordinator
    await coordinator.add_device(device.device_id, device.public_b64)
    await coordinator.wait_connected(10)
    await device.start()

    seqs = [device.enqueue(Kind.RESULT, {"i": i}) for i in range(FIRST)]
    await _answered(coordinator, device.device_id)
    await eventually(lambda: coordinator.store.count() >= FIRST, what="the first 200 stored")

    async def post_more() -> None:
        for i in range(SECOND):
            seqs.append(device.enqueue(Kind.RESULT, {"i": FIRST + i}))
            await asyncio.sleep(0.005)

    poster = asyncio.create_task(post_more())
    await asyncio.sleep(0.3)  # mid-stream
    agent_gate.shut()
    coord_gate.shut()
    broker.kill()
    await poster
    await asyncio.sleep(DOWN_S)
    broker.start()

    order = [(agent_gate, device.link.mqtt), (coord_gate, coordinator.mqtt)]
    if case.first == "coordinator":
        order.reverse()
    (gate1, client1), (gate2, client2) = order
    gate1.open = True
    await client1.wait_connected(RECONNECT_S)
    await asyncio.sleep(HEAD_START_S)
    gate2.open = True
    await client2.wait_connected(RECONNECT_S)
    both = time.monotonic()

    expected = FIRST + SECOND
    with contextlib.suppress(AssertionError):
        await eventually(lambda: coordinator.store.count() >= expected, timeout=WAIT_S)
    recovery = time.monotonic() - both
    stored = sorted(r["seq"] for r in coordinator.store.results_since(device.device_id, 0, 10_000))
    dups = coordinator.metrics.value("dgdm_duplicates_total")
    print(f"RECOVERY {case.id}: stored {len(stored)}/{expected} dups {dups:.0f} in {recovery:.1f}s")
    assert stored == sorted(seqs), f"{len(stored)}/{expected} stored"
    assert recovery <= RECOVERY_S, f"recovered in {recovery:.1f}s (> {RECOVERY_S}s)"
    await _answered(coordinator, device.device_id)
    await eventually(lambda: device.queued() == 0, what="every result receipted")


async def _answered(coordinator: Coordinator, device_id: str) -> None:
    seq = await coordinator.send_command(device_id, "ping")

    def replied() -> bool:
        found = coordinator.store.command(device_id, seq)
        return bool(found and found.get("reply"))

    await eventually(replied, what=f"the reply to ping {seq}")
    found = coordinator.store.command(device_id, seq)
    assert found is not None
    assert found["reply"]["data"] == {"pong": True}


def _wire(wire: str) -> dict[str, Any]:
    return {"wire": wire}
