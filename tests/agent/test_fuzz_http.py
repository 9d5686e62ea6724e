"""The HTTP surface fuzzed: whatever arrives, the agent answers below 500 and stays healthy."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

Agent = Any  # conftest.AgentProcess

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6)
    ),
    max_leaves=30,
)
NODE_ID = st.one_of(st.integers(-3, 5), st.sampled_from(["a", "b", "c", ""]), st.booleans())
NUMBER = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.integers(-(2**65), 2**65),
    st.booleans(),
    st.text(max_size=2),
)
NODE = st.fixed_dictionaries(
    {"id": NODE_ID}, optional={"features": st.lists(NUMBER, max_size=3), "x": JSON}
)
EDGE = st.fixed_dictionaries(
    {"source": NODE_ID, "target": NODE_ID}, optional={"weight": NUMBER, "w": JSON}
)
METHOD = st.fixed_dictionaries(
    {},
    optional={
        "kind": st.sampled_from(["ppr", "heat", "poly", "other", 1]),
        "alpha": NUMBER,
        "t": NUMBER,
        "k": st.one_of(st.none(), st.integers(-2, 2000), NUMBER),
        "coefficients": st.lists(NUMBER, max_size=4),
        "normalization": st.sampled_from(["sym", "col", "row", "bad"]),
        "self_loops": st.one_of(st.booleans(), NUMBER),
    },
)
GRAPH = st.fixed_dictionaries(
    {"nodes": st.lists(NODE, max_size=5)},
    optional={
        "edges": st.lists(EDGE, max_size=6),
        "directed": st.one_of(st.booleans(), JSON),
        "graph_id": st.one_of(st.text(max_size=140), JSON),
        "method": st.one_of(METHOD, JSON),
    },
)
COMPACT = st.fixed_dictionaries(
    {"num_nodes": st.one_of(st.integers(-1, 6), NUMBER)},
    optional={
        "edge_index": st.lists(
            st.lists(st.one_of(st.integers(-1, 7), NUMBER), max_size=5), max_size=3
        ),
        "edge_weight": st.lists(NUMBER, max_size=5),
        "x": st.lists(st.lists(NUMBER, max_size=3), max_size=7),
        "method": METHOD,
    },
)
BODY = st.one_of(
    JSON.map(lambda v: json.dumps(v).encode()),
    GRAPH.map(lambda v: json.dumps(v).encode()),
    COMPACT.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
)
PATH = st.one_of(
    st.sampled_from(
        [
            "/diffuse",
            "/diffuse?queue=1",
            "/diffuse?queue=x",
            "/graphs/g1",
            "/graphs/g1/diffuse",
            "/graphs/%00",
            "/graphs/" + "x" * 200,
            "/status",
            "/healthz",
            "/metrics",
            "/tpu",
            "/outbox",
            "/openapi.json",
            "/",
            "/graphs",
            "/nope",
            "//diffuse",
        ]
    ),
    st.text(alphabet="abcdefg/?=&%.", max_size=20).map(lambda p: "/" + p),
)
TOPOLOGY_CALLS = (
    ("POST", "/diffuse"),
    ("PUT", "/graphs/fz"),
    ("POST", "/graphs/fz/diffuse"),
    ("PATCH", "/graphs/fz"),
    ("DELETE", "/graphs/fz"),
)
METHODS = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE"])
CONTENT_TYPES = st.sampled_from(["application/json", "text/plain", None, "application/json; x=1"])


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(method=METHODS, path=PATH, body=BODY, content_type=CONTENT_TYPES)
def test_no_5xx_for_any_request(
    shared_agent: Agent, method: str, path: str, body: bytes, content_type: str | None
) -> None:
    data = None if method in ("GET", "DELETE") else body
    answer = shared_agent.request(method, path, data, content_type=content_type)
    assert answer.status < 500, (method, path, body[:200], answer.status, answer.body[:300])
    if answer.status >= 400:
        error = json.loads(answer.body)
        assert set(error) == {"error", "message"}
        assert error["message"]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(graph=st.one_of(GRAPH, COMPACT))
def test_graph_fuzz_then_topology_calls(shared_agent: Agent, graph: dict[str, Any]) -> None:
    data = json.dumps(graph).encode()
    for method, path in TOPOLOGY_CALLS:
        answer = shared_agent.request(method, path, data)
        assert answer.status < 500, (method, path, graph, answer.body[:300])
        OUTCOMES[answer.status] = OUTCOMES.get(answer.status, 0) + 1


OUTCOMES: dict[int, int] = {}


def test_still_healthy_after_fuzzing(shared_agent: Agent, karate: dict[str, Any]) -> None:
    # The generators reach past validation too: some fuzzed graphs were diffused.
    assert OUTCOMES.get(200, 0) > 0, OUTCOMES
    assert OUTCOMES.get(422, 0) > 0, OUTCOMES
    assert shared_agent.get("/healthz").status == 200
    assert shared_agent.post_json("/diffuse", karate).status == 200
    assert shared_agent.proc.poll() is None
