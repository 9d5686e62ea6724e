"""`latency_anomaly` end to end: an in-process agent with a real outbox and a real aiohttp
server; a topology registered and diffused over HTTP (`PUT /graphs/club`, then `POST
/graphs/club/diffuse` or the Open Inference Protocol's binary infer, one request at a time);
the engine's answers carry injected latencies (a steady baseline,
then a x5 slowdown, then recovery). The alert and its recovery must reach the outbox as
sealed alert envelopes naming the topology, the baseline and the observed latency."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from dgdm.agent.anomaly import CLEAR_AFTER, MIN_SAMPLES, RAISE_AFTER
from dgdm.agent.config import load_config
from dgdm.agent.runtime import Agent
from dgdm.sync.crypto import generate_keypair
from dgdm.sync.envelope import Kind, open_envelope

REPO = Path(__file__).resolve().parents[2]
DEVICE = "edge-anomaly"


def alert_bodies(agent: Agent) -> list[dict[str, Any]]:
    keys = agent.keys
    bodies = []
    for message in agent.outbox.pending(1000):
        if message.kind == Kind.ALERT:
            env = open_envelope(
                message.payload, key=keys.up, key_id=keys.key_id, expected_device=DEVICE
            )
            bodies.append(env.body)
    return bodies


async def wait_for_code(agent: Agent, code: str, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = [b for b in await asyncio.to_thread(alert_bodies, agent) if b["code"] == code]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, f"no {code} alert in the outbox"
        await asyncio.sleep(0.05)


def oip_binary(x: list[list[float]]) -> tuple[bytes, dict[str, str]]:
    raw = np.asarray(x, dtype="<f4")
    tensor = {"name": "x", "datatype": "FP32", "shape": list(raw.shape)}
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": raw.nbytes}}]})
    return header.encode() + raw.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


@pytest.mark.parametrize("route", ["graphs", "oip"])
async def test_latency_anomaly_reaches_the_outbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    dev_key, _, _ = generate_keypair(tmp_path / "keys", name="device")
    _, _, coord_b64 = generate_keypair(tmp_path / "keys", name="coordinator")
    env = {
        "DGDM__DEVICE__ID": DEVICE,
        "DGDM__DEVICE__DATA_DIR": str(tmp_path / "data"),
        "DGDM__DEVICE__PRIVATE_KEY": str(dev_key),
        "DGDM__SYNC__COORDINATOR_PUBLIC_KEY": coord_b64,
        "DGDM__HTTP__PORT": "0",
        "DGDM__KERNELS__BACKEND": "numpy",
    }
    agent = Agent(load_config(None, env=env), None, env={})
    await agent.start()
    baseline_ms, slow_ms = 2.0, 10.0
    series: Iterator[float] = iter(
        [baseline_ms] * (MIN_SAMPLES + 10)
        + [slow_ms] * (RAISE_AFTER + 2)
        + [baseline_ms] * (CLEAR_AFTER + 2)
    )
    real = agent.engine.diffuse_registered

    def slowed(graph_id: str, x: Any) -> Any:
        return dataclasses.replace(real(graph_id, x), latency_ms=next(series))

    monkeypatch.setattr(agent.engine, "diffuse_registered", slowed)
    graph = json.loads((REPO / "fixtures" / "karate.json").read_text())
    x = {"x": [node["features"] for node in graph["nodes"]]}
    base = f"http://127.0.0.1:{agent.http_port}/graphs/club"
    body, headers = oip_binary(x["x"])
    infer = f"http://127.0.0.1:{agent.http_port}/v2/models/club/infer"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.put(base, json={**graph, "graph_id": "club"}) as r:
                assert r.status in (200, 201), await r.text()

            async def diffuse(n: int) -> None:
                for _ in range(n):
                    if route == "oip":
                        request = session.post(infer, data=body, headers=headers)
                    else:
                        request = session.post(base + "/diffuse", json=x)
                    async with request as r:
                        assert r.status == 200, await r.text()

            await diffuse(MIN_SAMPLES + 10 + RAISE_AFTER - 1)
            assert not [b for b in alert_bodies(agent) if b["code"] == "latency_anomaly"]
            await diffuse(1)  # the RAISE_AFTER-th slow one
            alert = await wait_for_code(agent, "latency_anomaly")
            await diffuse(2 + CLEAR_AFTER + 2)
            recovery = await wait_for_code(agent, "latency_normal")
            bodies = alert_bodies(agent)
    finally:
        await agent.stop()
    assert alert["severity"] == "warning"
    details = alert["details"]
    assert details["graph_id"] == "club"
    assert details["features"] == 3
    assert details["baseline_ms"] == pytest.approx(baseline_ms)
    assert details["observed_ms"] == pytest.approx(slow_ms)
    assert "'club'" in alert["message"]
    assert "10 ms" in alert["message"]
    assert "2 ms" in alert["message"]
    assert recovery["details"]["graph_id"] == "club"
    codes = [b["code"] for b in bodies if b["code"].startswith("latency")]
    assert codes == ["latency_anomaly", "latency_normal"]  # announced once each
