"""The agent as a real process: health, status, metrics, diffusion and every refusal."""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

Agent = Any  # conftest.AgentProcess; conftest modules are not importable in importlib mode


def dense_ppr(graph: dict[str, Any], alpha: float = 0.15) -> np.ndarray:
    """SPEC §2 PPR, sym normalisation with self loops, solved densely in float64."""
    index = {node["id"]: i for i, node in enumerate(graph["nodes"])}
    n = len(index)
    a = np.eye(n)
    for edge in graph["edges"]:
        i, j, w = index[edge["source"]], index[edge["target"]], edge.get("weight", 1.0)
        a[i, j] += w
        if i != j:
            a[j, i] += w
    d = 1 / np.sqrt(a.sum(axis=1))
    t = d[:, None] * a * d[None, :]
    x = np.array([node["features"] for node in graph["nodes"]], dtype=float)
    return alpha * np.linalg.solve(np.eye(n) - (1 - alpha) * t, x)


def test_refused_diffusions_are_counted_by_reason(shared_agent: Agent) -> None:
    def refusals() -> float:
        for line in shared_agent.get("/metrics").body.decode().splitlines():
            if line.startswith('dgdm_diffusion_errors_total{reason="invalid_graph"}'):
                return float(line.split()[-1])
        return 0.0

    before = refusals()
    bad = {"nodes": [{"id": "a", "features": [1.0]}], "edges": [{"source": "a", "target": "z"}]}
    assert shared_agent.post_json("/diffuse", bad).status == 422
    assert refusals() == before + 1


def test_healthz_status_metrics(shared_agent: Agent, karate: dict[str, Any]) -> None:
    assert shared_agent.post_json("/diffuse", karate).status == 200
    health = shared_agent.get("/healthz")
    assert health.status == 200
    assert health.json()["status"] == "ok"
    status = shared_agent.get("/status").json()
    assert status["device_id"] == "edge-test"
    assert status["active_backend"] == "numpy"
    assert status["outbox"] == {"enabled": False}
    assert status["config"]["http"]["token"] is None
    metrics = shared_agent.get("/metrics")
    assert metrics.status == 200
    assert metrics.headers["Content-Type"].startswith("text/plain")
    assert b"dgdm_diffusion_duration_seconds" in metrics.body
    assert b"dgdm_tpu_present 0.0" in metrics.body


def test_diffuse_matches_dense_ppr(shared_agent: Agent, karate: dict[str, Any]) -> None:
    graph = karate
    answer = shared_agent.post_json("/diffuse", graph)
    assert answer.status == 200, answer.body
    got = answer.json()
    assert set(got) >= {"job_id", "backend", "latency_ms", "error_bound", "node_ids", "embedding"}
    assert got["backend"] == "numpy"
    assert got["node_ids"] == [node["id"] for node in graph["nodes"]]
    z = np.array(got["embedding"])
    expected = dense_ppr(graph)
    err = np.linalg.norm(z - expected) / np.linalg.norm(expected)
    assert err <= max(got["error_bound"], 1e-6) * 1.01
    metrics = shared_agent.get("/metrics").body.decode()
    assert 'dgdm_diffusions_total{backend="numpy",source="http"}' in metrics


def test_repeated_topology_with_new_features_is_answered_correctly(
    shared_agent: Agent, karate: dict[str, Any]
) -> None:
    """The second and later posts of a topology take the fast path (parsed and diffused on
    the loop, cached operator and runner): the features must still be this request's."""
    rng = np.random.default_rng(11)
    for _ in range(4):
        nodes = [{**node, "features": rng.random(3).tolist()} for node in karate["nodes"]]
        graph = {**karate, "nodes": nodes}
        got = shared_agent.post_json("/diffuse", graph).json()
        expected = dense_ppr(graph)
        z = np.array(got["embedding"])
        assert np.linalg.norm(z - expected) / np.linalg.norm(expected) <= 1e-5


def test_registered_topology_lifecycle(shared_agent: Agent, karate: dict[str, Any]) -> None:
    graph = {**karate, "graph_id": "club"}
    mismatch = shared_agent.request("PUT", "/graphs/other", json.dumps(graph).encode())
    assert _error(mismatch) == (422, "invalid_graph")
    put = shared_agent.request("PUT", "/graphs/club", json.dumps(graph).encode())
    assert put.status == 200, put.body
    assert put.json()["nodes"] == 34
    x = [node["features"] for node in graph["nodes"]]
    first = shared_agent.post_json("/graphs/club/diffuse", {"x": x})
    assert first.status == 200, first.body
    plain = shared_agent.post_json("/diffuse", graph).json()
    assert np.allclose(first.json()["embedding"], plain["embedding"], rtol=1e-5, atol=1e-6)

    patch = shared_agent.request(
        "PATCH", "/graphs/club", json.dumps({"add": [{"source": 0, "target": 9}]}).encode()
    )
    assert patch.status == 200, patch.body
    assert patch.json()["edges"] == put.json()["edges"] + 2  # undirected: both directions
    changed = shared_agent.post_json("/graphs/club/diffuse", {"x": x}).json()
    assert not np.allclose(changed["embedding"], first.json()["embedding"])

    assert shared_agent.request("DELETE", "/graphs/club").status == 200
    gone = shared_agent.post_json("/graphs/club/diffuse", {"x": x})
    assert (gone.status, gone.json()["error"]) == (404, "unknown_graph")


def _error(response: Any) -> tuple[int, str]:
    return response.status, response.json()["error"]


def test_refusals_are_json_4xx(shared_agent: Agent, karate: dict[str, Any]) -> None:
    agent = shared_agent
    assert _error(agent.request("POST", "/diffuse", b"{nope")) == (400, "bad_json")
    assert _error(agent.request("POST", "/diffuse", b"")) == (400, "empty_body")
    assert _error(agent.request("POST", "/diffuse", b"{}", content_type="text/plain")) == (
        415,
        "unsupported_media_type",
    )
    bad_edge = {
        "nodes": [{"id": "a", "features": [1.0]}],
        "edges": [{"source": "a", "target": "z"}],
    }
    refused = agent.post_json("/diffuse", bad_edge)
    assert _error(refused) == (422, "invalid_graph")
    assert "edges[0].target" in refused.json()["message"]
    assert _error(agent.post_json("/diffuse?queue=maybe", karate)) == (400, "bad_query")
    assert _error(agent.post_json("/diffuse?queue=1", karate)) == (400, "no_outbox")
    assert _error(agent.get("/nope")) == (404, "not_found")
    assert _error(agent.request("DELETE", "/healthz")) == (405, "method_not_allowed")
    assert _error(agent.request("PUT", "/graphs/bad%20id", b"{}")) == (422, "invalid_graph")
    ragged = {"x": [[1.0]] * 33 + [[1.0, 2.0]]}
    karate.pop("graph_id")
    assert agent.request("PUT", "/graphs/r", json.dumps(karate).encode()).status == 200
    assert _error(agent.post_json("/graphs/r/diffuse", ragged)) == (422, "invalid_graph")
    assert _error(agent.post_json("/graphs/r/diffuse", {"x": [[True]] * 34})) == (
        422,
        "invalid_graph",
    )
    assert agent.get("/healthz").status == 200


def test_body_and_graph_limits(start_agent: Any) -> None:
    agent = start_agent({"http": {"max_body_bytes": 4096}, "kernels": {"max_nodes": 10}})
    big = agent.request("POST", "/diffuse", b"[" + b"0," * 5000 + b"0]")
    assert _error(big) == (413, "too_large")
    many = agent.post_json("/diffuse", {"num_nodes": 11, "edge_index": [[], []]})
    assert _error(many) == (413, "too_large")
    assert agent.get("/healthz").status == 200


def test_token_required_except_healthz(start_agent: Any) -> None:
    agent = start_agent({"http": {"token": "s3cret-token"}})
    assert agent.get("/healthz", headers={"Authorization": ""}).status == 200
    refused = agent.get("/status", headers={"Authorization": "Bearer wrong"})
    assert _error(refused) == (401, "unauthorized")
    assert refused.headers["WWW-Authenticate"] == "Bearer"
    assert agent.get("/status").status == 200
    assert "s3cret-token" not in agent.log_path.read_text()
    assert agent.get("/status").json()["config"]["http"]["token"] == "***"


def test_full_queue_answers_503_with_retry_after(start_agent: Any) -> None:
    agent = start_agent({"kernels": {"workers": 1, "queue_size": 0, "backend": "numpy"}})
    slow = slow_graph()
    results: list[Any] = []

    def call() -> None:
        results.append(agent.post_json("/diffuse", slow))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r.status for r in results)
    assert 200 in statuses, statuses
    assert 503 in statuses, statuses
    busy = next(r for r in results if r.status == 503)
    assert busy.json()["error"] == "busy"
    assert int(busy.headers["Retry-After"]) >= 1


def slow_graph(n: int = 1500, features: int = 64) -> dict[str, Any]:
    """A graph whose dense PPR solve takes a noticeable fraction of a second."""
    rng = np.random.default_rng(7)
    src = rng.integers(0, n, 6 * n).tolist()
    dst = rng.integers(0, n, 6 * n).tolist()
    return {
        "num_nodes": n,
        "edge_index": [src, dst],
        "x": rng.random((n, features)).round(3).tolist(),
    }
