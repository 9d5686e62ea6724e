"""Registered topologies are bounded (`kernels.max_topologies`, `kernels.max_topology_bytes`),
so a local client cannot fill memory or the disk with them, and an agent whose cache holds
more than its limits (lowered since, or copied in) still starts: it loads what fits, logs
the rest, and keeps their files for a restart with larger limits."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

Agent = Any  # conftest.AgentProcess


def ring(n: int, offset: int = 0) -> dict[str, Any]:
    """A ring of n nodes with 2 features; `offset` makes topologies distinct."""
    nodes = [{"id": i, "features": [1.0, float(i % 3)]} for i in range(n)]
    edges = [{"source": i, "target": (i + 1 + offset) % n} for i in range(n)]
    return {"directed": False, "nodes": nodes, "edges": edges}


def put(agent: Agent, graph_id: str, graph: dict[str, Any]) -> Any:
    return agent.request("PUT", f"/graphs/{graph_id}", json.dumps(graph).encode())


def registered(agent: Agent) -> list[str]:
    return sorted(g["graph_id"] for g in agent.get("/graphs").json()["graphs"])


def test_max_topologies_refuses_the_next_with_413_naming_the_limit(
    start_agent: Callable[..., Agent],
) -> None:
    agent = start_agent({"kernels": {"backend": "numpy", "max_topologies": 3}})
    for i in range(3):
        assert put(agent, f"g{i}", ring(20, i)).status == 200
    refused = put(agent, "g3", ring(20, 3))
    assert refused.status == 413, refused.body
    assert refused.json()["error"] == "too_large"
    assert "kernels.max_topologies" in refused.json()["message"]
    assert put(agent, "g1", ring(20, 7)).status == 200  # replacing one takes no new room
    assert agent.request("DELETE", "/graphs/g0").status == 200
    assert put(agent, "g3", ring(20, 3)).status == 200
    assert registered(agent) == ["g1", "g2", "g3"]


def test_max_topology_bytes_refuses_a_registration_past_it(
    start_agent: Callable[..., Agent],
) -> None:
    agent = start_agent({"kernels": {"backend": "numpy", "max_topology_bytes": 200_000}})
    assert put(agent, "small", ring(100)).status == 200
    refused = put(agent, "big", ring(5_000))
    assert refused.status == 413, refused.body
    assert "kernels.max_topology_bytes" in refused.json()["message"]
    assert registered(agent) == ["small"]
    # An edge update replaces the topology's bytes, it does not add a second copy.
    grow = {"add": [{"source": i, "target": (i + 50) % 100} for i in range(100)]}
    assert agent.request("PATCH", "/graphs/small", json.dumps(grow).encode()).status == 200
    agent.stop()
    cache = agent.data_dir / "cache" / "topologies"
    assert len(list(cache.glob("*.npz"))) == 1  # the refused one left no file behind


def test_start_up_with_more_cached_than_the_limits_loads_what_fits(
    start_agent: Callable[..., Agent],
) -> None:
    first = start_agent({"kernels": {"backend": "numpy"}})
    for i in range(5):
        assert put(first, f"g{i}", ring(30, i)).status == 200
    first.stop()
    data = {"data_dir": str(first.data_dir)}

    second = start_agent({"device": data, "kernels": {"backend": "numpy", "max_topologies": 2}})
    assert registered(second) == ["g0", "g1"]
    skipped = [r for r in second.logs() if "not loaded" in r.get("msg", "")]
    assert len(skipped) == 1, skipped
    assert skipped[0]["graph_ids"] == ["g2", "g3", "g4"]
    assert skipped[0]["limit"] == "kernels.max_topologies"
    assert put(second, "g9", ring(30, 9)).status == 413  # the two loaded fill it
    assert second.request("DELETE", "/graphs/g4").status == 200  # a skipped one can go
    second.stop()

    third = start_agent({"device": data, "kernels": {"backend": "numpy"}})
    assert registered(third) == ["g0", "g1", "g2", "g3"]
