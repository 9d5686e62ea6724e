"""The event loop stays responsive while a large diffusion runs (STYLE: blocking work never
runs on the loop). An in-process agent, a real aiohttp server and client."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import aiohttp
import numpy as np

from dgdm.agent.config import load_config
from dgdm.agent.runtime import Agent

MAX_BLOCK_S = 0.050


async def _watch_loop(stop: asyncio.Event, worst: list[float]) -> None:
    while not stop.is_set():
        before = time.perf_counter()
        await asyncio.sleep(0.002)
        worst[0] = max(worst[0], time.perf_counter() - before - 0.002)


async def test_loop_not_blocked_during_large_diffusion(tmp_path: Path) -> None:
    env = {
        "DGDM__DEVICE__DATA_DIR": str(tmp_path),
        "DGDM__HTTP__PORT": "0",
        "DGDM__KERNELS__BACKEND": "sparse",
    }
    agent = Agent(load_config(None, env=env), None, env={})
    await agent.start()
    rng = np.random.default_rng(1)
    n, f = 20_000, 16
    graph = {
        "num_nodes": n,
        "edge_index": rng.integers(0, n, (2, 8 * n)).tolist(),
        "x": rng.random((n, f)).round(4).tolist(),
        "method": {"kind": "heat", "t": 3.0},
    }
    body = json.dumps(graph).encode()
    stop, worst = asyncio.Event(), [0.0]
    try:
        async with aiohttp.ClientSession() as session:
            watcher = asyncio.create_task(_watch_loop(stop, worst))
            started = time.perf_counter()
            url = f"http://127.0.0.1:{agent.http_port}/diffuse"
            headers = {"Content-Type": "application/json"}
            async with session.post(url, data=io.BytesIO(body), headers=headers) as r:
                assert r.status == 200, await r.text()
                answer = await r.read()
            took = time.perf_counter() - started
            stop.set()
            await watcher
    finally:
        await agent.stop()
    assert len(answer) > n * f  # the whole embedding came back
    assert took > 4 * MAX_BLOCK_S, "the diffusion was too quick to prove anything"
    assert worst[0] < MAX_BLOCK_S, f"loop blocked for {worst[0] * 1000:.1f} ms (took {took:.2f} s)"
