"""Every diffusion has a deadline and a memory bound (issue 20, items 3 and 4), against
the real agent process: exact PPR at `kernels.max_nodes` answers within its deadline and
+1 GB; a request over its deadline is stopped (the worker is free again at once), answers
504 with a JSON error and is counted; a heavy request never holds up small ones; a
diffusion whose working memory would pass `kernels.max_diffusion_bytes` is refused (413)
before any work starts."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest


def random_graph(
    n: int,
    degree: int,
    features: int,
    *,
    seed: int = 0,
    directed: bool = False,
    method: dict[str, Any] | None = None,
) -> bytes:
    """A compact-form body: a random graph with n * degree / 2 edges (n * degree directed)."""
    rng = np.random.default_rng(seed)
    m = n * degree if directed else n * degree // 2
    edges = rng.integers(0, n, size=(2, m))
    x = np.round(rng.random((n, features)), 3)
    body = {
        "num_nodes": n,
        "edge_index": edges.tolist(),
        "x": x.tolist(),
        "directed": directed,
        "method": method or {"kind": "ppr", "k": None},
    }
    return json.dumps(body).encode()


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident MB of the agent and every process it started."""
    now = peak = 0.0
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    for proc in procs:
        text = Path(f"/proc/{proc.pid}/status").read_text(encoding="ascii")
        status = dict(line.split(":", 1) for line in text.splitlines())
        now += int(status["VmRSS"].split()[0]) / 1024
        peak += int(status["VmHWM"].split()[0]) / 1024
    return now, peak


def counted(agent: Any, reason: str) -> float:
    text = agent.get("/metrics").body.decode()
    line = f'dgdm_diffusion_errors_total{{reason="{reason}"}} '
    hits = [row for row in text.splitlines() if row.startswith(line)]
    return float(hits[0].split()[-1]) if hits else 0.0


# A directed random graph and a teleport of 0.005: the exact solve needs thousands of
# products with T, seconds of work that checks its deadline between them.
HEAVY = {"kind": "ppr", "k": None, "alpha": 0.005, "normalization": "row"}


@pytest.mark.slow
def test_exact_ppr_at_max_nodes_answers_within_its_deadline_and_a_gigabyte(
    start_agent: Callable[..., Any],
) -> None:
    agent = start_agent({"kernels": {"max_nodes": 100_000}})
    body = random_graph(100_000, 10, 4, seed=1)
    agent.post_json("/diffuse", {"num_nodes": 3, "edge_index": [[0], [1]], "x": [[1], [0], [0]]})
    before, _ = rss_mb(agent.proc.pid)
    start = time.monotonic()
    answer = agent.request("POST", "/diffuse", body, timeout=35.0)
    took = time.monotonic() - start
    _, peak = rss_mb(agent.proc.pid)
    print(f"exact ppr 100k: {answer.status} in {took:.1f} s, RSS {before:.0f} -> peak {peak:.0f}")
    assert answer.status in (200, 413, 422), answer.body[:300]
    assert took < 30.0
    assert peak - before < 1024
    if answer.status == 200:
        z = np.array(answer.json()["embedding"])
        assert z.shape == (100_000, 4)
        assert np.isfinite(z).all()


def test_a_request_over_its_deadline_is_stopped_answers_504_and_is_counted(
    start_agent: Callable[..., Any],
) -> None:
    agent = start_agent({})
    heavy = random_graph(20_000, 5, 2, seed=2, directed=True, method=HEAVY)
    start = time.monotonic()
    answer = agent.request("POST", "/diffuse?deadline_s=1", heavy, timeout=60.0)
    took = time.monotonic() - start
    print(f"heavy with deadline_s=1: {answer.status} in {took:.2f} s")
    assert answer.status == 504, answer.body[:300]
    assert answer.json()["error"] == "deadline_exceeded"
    assert "deadline" in answer.json()["message"]
    assert took < 5.0
    assert counted(agent, "deadline_exceeded") == 1.0
    # Stopped, not abandoned: the worker takes the next heavy request at once.
    start = time.monotonic()
    again = agent.request("POST", "/diffuse?deadline_s=0.5", heavy, timeout=60.0)
    assert again.status == 504
    assert time.monotonic() - start < 4.0
    health = agent.get("/healthz")
    assert health.status == 200, health.body
    bad = agent.request("POST", "/diffuse?deadline_s=soon", heavy)
    assert bad.status == 400
    assert "deadline_s" in bad.json()["message"]


def timed(agent: Any, body: bytes) -> float:
    """Milliseconds to a 200 answer."""
    start = time.monotonic()
    answer = agent.request("POST", "/diffuse", body, timeout=20.0)
    assert answer.status == 200, answer.body[:300]
    return (time.monotonic() - start) * 1000


def oip_infer(agent: Any, model: str, x: np.ndarray) -> Any:
    """An Open Inference Protocol binary infer of x on a registered topology."""
    raw = np.ascontiguousarray(x, dtype="<f4")
    tensor = {"name": "x", "datatype": "FP32", "shape": list(raw.shape)}
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": raw.nbytes}}]})
    return agent.request(
        "POST",
        f"/v2/models/{model}/infer",
        header.encode() + raw.tobytes(),
        content_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=60.0,
    )


@pytest.mark.parametrize("heavy_route", ["diffuse", "oip"])
def test_small_diffusions_stay_quick_beside_a_heavy_one(
    start_agent: Callable[..., Any], heavy_route: str
) -> None:
    """The heavy request comes as a one-off graph or as an OIP infer on a registered
    topology: either way it runs in the heavy lane, not in the small ones' worker."""
    agent = start_agent({})
    heavy = random_graph(50_000, 5, 2, seed=3, directed=True, method=HEAVY)
    if heavy_route == "oip":
        registered = agent.request("PUT", "/graphs/big", heavy, timeout=60.0)
        assert registered.status in (200, 201), registered.body[:300]
        x = np.random.default_rng(3).random((50_000, 2))
    small = [random_graph(100, 4, 16, seed=100 + i) for i in range(165)]
    for body in small[:5]:  # warm up: imports, the first build of each kind
        timed(agent, body)
    alone = [timed(agent, body) for body in small[5:65]]
    heavy_answer: list[Any] = []

    def run_heavy() -> Any:
        if heavy_route == "oip":
            return oip_infer(agent, "big", x)
        return agent.request("POST", "/diffuse?deadline_s=15", heavy, timeout=60.0)

    runner = threading.Thread(target=lambda: heavy_answer.append(run_heavy()))
    runner.start()
    time.sleep(1.5)  # its body is read and parsed: the diffusion is running
    beside = [timed(agent, body) for body in small[65:]]
    heavy_running = runner.is_alive()
    runner.join(60)
    p99_alone = float(np.percentile(alone, 99))
    p50, p99 = np.percentile(beside, [50, 99])
    print(
        f"small beside heavy: p50 {p50:.1f} ms, p99 {p99:.1f} ms (alone: p99 {p99_alone:.1f} "
        f"ms); heavy {heavy_answer[0].status}"
    )
    assert heavy_running, "the heavy request ended before the small ones: nothing was measured"
    # 50 ms on an idle box; a loaded one (other tests on both cores) slows everything alike
    assert p99 < max(50.0, 3 * p99_alone)


def test_a_diffusion_over_the_memory_bound_is_refused_before_it_starts(
    start_agent: Callable[..., Any],
) -> None:
    agent = start_agent({"kernels": {"max_diffusion_bytes": 8 * 1024 * 1024}})
    body = random_graph(20_000, 10, 8, seed=4)
    start = time.monotonic()
    answer = agent.request("POST", "/diffuse", body, timeout=60.0)
    assert answer.status == 413, answer.body[:300]
    assert "kernels.max_diffusion_bytes" in answer.json()["message"]
    assert time.monotonic() - start < 5.0
    assert agent.request("POST", "/diffuse", random_graph(100, 4, 2)).status == 200


@pytest.mark.slow
def test_healthz_reports_a_worker_stuck_past_its_deadline(start_agent: Callable[..., Any]) -> None:
    agent = start_agent({})
    # Exact heat is scipy's expm_multiply, which nothing can interrupt: 4.5 s of it on a
    # fast machine (AVX-512 Xeon), ~10 s on others; the answer comes at 1 s + the 2 s grace.
    body = random_graph(20_000, 5, 2, seed=6, method={"kind": "heat", "t": 1000.0, "k": None})
    start = time.monotonic()
    answer = agent.request("POST", "/diffuse?deadline_s=1", body, timeout=60.0)
    took = time.monotonic() - start
    assert answer.status == 504, answer.body[:300]
    assert "did not stop in time" in answer.json()["message"]
    assert took < 6.0  # 1 s + the 2 s grace
    health = agent.get("/healthz")
    for _ in range(20):
        if health.status == 503:
            break
        time.sleep(0.1)
        health = agent.get("/healthz")
    print(f"stuck worker: 504 after {took:.1f} s, /healthz {health.status} {health.json()}")
    assert health.status == 503
    assert health.json()["checks"]["workers"] is False
    assert agent.request("POST", "/diffuse", random_graph(100, 4, 2)).status == 200
    deadline = time.monotonic() + 90.0
    while agent.get("/healthz").status != 200:  # healthy again once the call ends
        assert time.monotonic() < deadline, "still stuck after 90 s"
        time.sleep(0.5)
