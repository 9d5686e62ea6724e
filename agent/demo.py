"""`dgdm demo`: a broker, a coordinator and one agent on this machine, end to end.

Everything lives in a temporary directory and on free loopback ports: a private broker
(mosquitto when installed, else amqtt speaking MQTT 3.1.1), X25519 keys for the device and
the coordinator, the coordinator in this process, and the agent as a real service process
(`python -m dgdm.agent agent --config ...`) in its own process group. Graphs go to the
agent's `POST /diffuse?queue=1`; the results are shown as they reach the coordinator, then
a summary. Ctrl-C (or the end) stops the agent's process group, the coordinator and the
broker, and removes the directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.resources
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgdm.agent.errors import DemoError

DEVICE_ID = "demo-edge-1"
READY_TIMEOUT_S = 20.0
ARRIVAL_TIMEOUT_S = 20.0


@dataclass
class Tally:
    sent: dict[str, float] = field(default_factory=dict)  # job_id -> monotonic send time
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    arrived: dict[str, float] = field(default_factory=dict)  # job_id -> end-to-end seconds
    backends: dict[str, int] = field(default_factory=dict)
    refused: int = 0


def main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(run(args.graphs, args.duration))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted: everything stopped and removed.")
        return 130


async def run(graphs: int, duration_s: float | None) -> int:
    from dgdm.sync.broker import Broker

    # SIGTERM takes the same way out as Ctrl-C: cancel, then clean up in the finally below.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dgdm-demo-") as tmp:
        work = Path(tmp)
        broker = await asyncio.to_thread(lambda: Broker(work / "broker").start())
        agent: subprocess.Popen[bytes] | None = None
        coordinator: Any = None
        try:
            _say(f"broker    {broker.engine} on {broker.url} (MQTT {broker.mqtt_version})")
            coordinator, agent_config = await _start_coordinator(work, broker)
            began = time.monotonic()
            agent = await asyncio.to_thread(_spawn_agent, agent_config, work / "agent.log")
            port = await _agent_port(agent_config)
            await _wait_healthy(agent, port, work / "agent.log")
            _say(f"agent     pid {agent.pid} on http://127.0.0.1:{port}, ready in "
                 f"{time.monotonic() - began:.2f} s (log: {work / 'agent.log'})")  # fmt: skip
            tally = await _exercise(coordinator, port, graphs, duration_s)
            _summary(tally, time.monotonic() - started)
        finally:
            await _shutdown(agent, coordinator, broker)
    return 0


async def _start_coordinator(work: Path, broker: Any) -> tuple[Any, Path]:
    from dgdm.sync.coordinator.config import (
        CoordinatorConfig,
        CoordinatorSection,
        HttpSection,
        MqttSection,
    )
    from dgdm.sync.coordinator.service import Coordinator
    from dgdm.sync.crypto import generate_keypair

    keys = work / "keys"
    device_key, _, device_pub = generate_keypair(keys, name="device")
    coord_key, _, coord_pub = generate_keypair(keys, name="coordinator")
    config = CoordinatorConfig(
        coordinator=CoordinatorSection(data_dir=work / "coordinator", private_key=coord_key),
        mqtt=MqttSection(broker_url=broker.url, mqtt_version=broker.mqtt_version),
        http=HttpSection(port=0),
    )
    coordinator = Coordinator(config)
    await coordinator.start(http=False)
    await coordinator.add_device(DEVICE_ID, device_pub)
    await coordinator.wait_connected(10)
    _say(f"coordinator in-process, device {DEVICE_ID} enrolled (X25519 keys in {keys})")
    return coordinator, _write_agent_config(work, broker, device_key, coord_pub)


def _write_agent_config(work: Path, broker: Any, device_key: Path, coord_pub: str) -> Path:
    from dgdm.sync.broker import free_port

    path = work / "agent.toml"
    path.write_text(
        f"""[device]
id = "{DEVICE_ID}"
data_dir = "{work / "agent"}"
private_key = "{device_key}"

[http]
port = {free_port()}

[sync]
broker_url = "{broker.url}"
mqtt_version = "{broker.mqtt_version}"
coordinator_public_key = "{coord_pub}"

[telemetry]
interval_s = 1.0
batch_s = 2.0

[log]
level = "warning"
""",
        encoding="utf-8",
    )
    return path


async def _agent_port(config: Path) -> int:
    import tomllib

    text = await asyncio.to_thread(config.read_text, encoding="utf-8")
    return int(tomllib.loads(text)["http"]["port"])


def _spawn_agent(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "dgdm.agent", "agent", "--config", str(config)]
    # Its own process group: a Ctrl-C in the terminal reaches only this process, and the
    # cleanup signals the whole group, so nothing the agent started outlives the demo.
    with log_path.open("wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


async def _wait_healthy(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    import aiohttp

    deadline = time.monotonic() + READY_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (await asyncio.to_thread(log.read_bytes))[-2000:].decode(errors="replace")
                raise DemoError(f"the agent exited with {proc.returncode}:\n{tail}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{port}/healthz") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise DemoError(f"the agent was not healthy within {READY_TIMEOUT_S:.0f} s")


def demo_graphs() -> list[dict[str, Any]]:
    """The embedded karate club graph under three methods, features varied per request."""
    text = importlib.resources.files("dgdm.kernels").joinpath("data/karate.json").read_text()
    base = json.loads(text)
    methods = [
        {"kind": "ppr", "alpha": 0.15},
        {"kind": "heat", "t": 3.0},
        {"kind": "ppr", "alpha": 0.3, "k": 10},
    ]
    return [{**base, "graph_id": f"karate-{m['kind']}", "method": m} for m in methods]


async def _exercise(coordinator: Any, port: int, graphs: int, duration_s: float | None) -> Tally:
    import aiohttp

    tally = Tally()
    shapes = demo_graphs()
    url = f"http://127.0.0.1:{port}/diffuse?queue=1"
    deadline = None if duration_s is None else time.monotonic() + duration_s
    what = f"graphs for {duration_s:.0f} s" if duration_s else f"{graphs} graphs"
    _say(f"sending   {what} to POST /diffuse?queue=1 ...")
    watcher = asyncio.create_task(_watch_results(coordinator, tally))
    try:
        async with aiohttp.ClientSession() as session:
            i = 0
            while (i < graphs) if deadline is None else (time.monotonic() < deadline):
                await _send(session, url, _vary(shapes[i % len(shapes)], i), tally)
                i += 1
                await asyncio.sleep(0.05)
        await _wait_arrivals(tally)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return tally


def _vary(graph: dict[str, Any], i: int) -> dict[str, Any]:
    nodes = [
        {**node, "features": [v * (1 + 0.01 * i) for v in node["features"]]}
        for node in graph["nodes"]
    ]
    return {**graph, "nodes": nodes}


async def _send(session: Any, url: str, graph: dict[str, Any], tally: Tally) -> None:
    sent = time.monotonic()
    async with session.post(url, json=graph) as r:
        answer = await r.json()
    if r.status != 200:
        tally.refused += 1
        _say(f"  refused {r.status}: {answer.get('message')}")
        return
    tally.sent[answer["job_id"]] = sent
    tally.answers[answer["job_id"]] = answer
    tally.backends[answer["backend"]] = tally.backends.get(answer["backend"], 0) + 1


async def _watch_results(coordinator: Any, tally: Tally) -> None:
    cursor = 0
    while True:
        rows = await coordinator.results_since(DEVICE_ID, cursor, 500)
        now = time.monotonic()
        for row in rows:
            cursor = max(cursor, row["cursor"])
            body = row["body"]
            job = body.get("job_id")
            if job in tally.sent and job not in tally.arrived:
                tally.arrived[job] = now - tally.sent[job]
                shape = body["embedding"]["shape"]
                _say(f"  result  seq {row['seq']:>4}  {body['graph_id']:<12} "
                     f"{body['backend']:<7} {body['latency_ms']:7.3f} ms  "
                     f"embedding {shape[0]}x{shape[1]}  error<={body['error_bound']:.4f}  "
                     f"end-to-end {tally.arrived[job] * 1000:6.1f} ms")  # fmt: skip
        await asyncio.sleep(0.02)


async def _wait_arrivals(tally: Tally) -> None:
    deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
    while len(tally.arrived) < len(tally.sent) and time.monotonic() < deadline:  # noqa: ASYNC110 - the watcher task fills tally; polling it is simplest
        await asyncio.sleep(0.05)


def _summary(tally: Tally, elapsed_s: float) -> None:
    latencies = [a["latency_ms"] for a in tally.answers.values()]
    e2e = [s * 1000 for s in tally.arrived.values()]
    print()
    _say("summary")
    _say(f"  graphs sent {len(tally.sent)}, refused {tally.refused}, "
         f"results at the coordinator {len(tally.arrived)}/{len(tally.sent)}")  # fmt: skip
    _say(f"  backends    {', '.join(f'{k}: {v}' for k, v in sorted(tally.backends.items()))}")
    if latencies:
        _say(f"  diffusion   median {statistics.median(latencies):.3f} ms, "
             f"max {max(latencies):.3f} ms")  # fmt: skip
    if e2e:
        _say(f"  end to end  (HTTP send -> stored at the coordinator) median "
             f"{statistics.median(e2e):.1f} ms, max {max(e2e):.1f} ms")  # fmt: skip
    _say(f"  total time  {elapsed_s:.1f} s")
    if len(tally.arrived) < len(tally.sent):
        raise DemoError("some results did not reach the coordinator in time")


async def _shutdown(agent: subprocess.Popen[bytes] | None, coordinator: Any, broker: Any) -> None:
    if agent is not None:
        await asyncio.to_thread(_stop_group, agent)
    if coordinator is not None:
        with contextlib.suppress(Exception):
            await coordinator.stop()
    await asyncio.to_thread(broker.stop)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the agent's process group (it drains within 10 s), SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(12)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _say(text: str) -> None:
    print(text, flush=True)
