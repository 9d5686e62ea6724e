"""The engine's runner and problem caches are bounded by bytes (issue 20, item 6), against
the real agent process: many distinct graphs, each leaving a dense propagator behind, keep
its memory near `kernels.cache_bytes` instead of growing with the count of graphs."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil

N = 1500  # a float32 dense propagator of 9 MB per graph
GRAPHS = 30


def body(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    graph = {
        "num_nodes": N,
        "edge_index": rng.integers(0, N, size=(2, 3 * N)).tolist(),
        "x": np.round(rng.random((N, 2)), 3).tolist(),
        "method": {"kind": "ppr", "k": 4},
    }
    return json.dumps(graph).encode()


def test_many_distinct_graphs_keep_memory_bounded(start_agent: Callable[..., Any]) -> None:
    agent = start_agent({"kernels": {"backend": "numpy", "cache_bytes": 32 * 1024 * 1024}})
    proc = psutil.Process(agent.proc.pid)
    assert agent.request("POST", "/diffuse", body(0)).status == 200
    before = proc.memory_info().rss / 2**20
    for seed in range(1, GRAPHS + 1):
        answer = agent.request("POST", "/diffuse", body(seed), timeout=60.0)
        assert answer.status == 200, answer.body[:300]
    after = proc.memory_info().rss / 2**20
    print(f"{GRAPHS} distinct {N}-node graphs: RSS {before:.0f} -> {after:.0f} MB")
    # 30 propagators of 9 MB would be 270 MB; the cache keeps ~32 MB of them.
    assert after - before < 150
