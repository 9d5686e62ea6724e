"""`/openapi.json` describes the whole local HTTP endpoint (SPEC §4 and the Open Inference
Protocol routes of §4.1) as the agent answers them: schemathesis (`run --checks all`, its
coverage, fuzzing and stateful phases) against live agents in both security setups, a
token set (with an outbox and a queued result) and loopback without one (no outbox),
finds no failure, and the agent logs no 500.

Limits of what this proves, on purpose:
- `positive_data_acceptance` is excluded: JSON Schema cannot say that an input's N is the
  model's node count, that `data` holds B x N x F numbers, that node ids are unique, that
  an edge names a known node or that feature rows have one width, so schema-valid
  requests are rightly refused with 400 or 422.
- 413 counts as rejecting a schema-violating body (a size limit is checked before the
  fields that violate the schema).
- 504 is not taken as a server error: it is the documented `deadline_exceeded` answer to
  a `?deadline_s=` the diffusion cannot meet (schemathesis sends 5e-324 s).
- Binary bodies (`application/octet-stream`, the binary tensor extension) are only fuzzed
  with random bytes here (every one must be refused below 500); a well-formed binary
  request needs the JSON header's length in a header, which schemathesis cannot derive.
  test_oip.py drives the binary extension with tritonclient.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dgdm.sync.crypto import generate_keypair

from .test_serving_processes import serving_pids

pytest.importorskip("schemathesis")

TOKEN = "openapi-token"
Agent = Any  # conftest.AgentProcess
SETUPS = {
    # A token set: bearer security on every operation but /healthz and /v2/health/*; with an
    # outbox, so ?queue=1 answers carry outbox_seq and /outbox, /status show its depth; and a
    # serving process beside the agent, so what it answers and passes on conforms too.
    "token": {"http": {"token": TOKEN, "processes": 2}, "kernels": {"backend": "numpy"}},
    # Loopback without a token: the document asks for no credentials at all; no outbox.
    "loopback": {"http": {}, "kernels": {"backend": "numpy"}},
}
# Every operation but GET /openapi.json, which schemathesis does not test (it is the schema).
OPERATIONS = 21


def _schemathesis_config(path: Path, version: str) -> Path:
    """Most generated requests should reach a model: its name and version fixed."""
    path.write_text(
        "[parameters]\n"
        f'"path.name" = "karate"\n"path.version" = "{version}"\n'
        "[checks.not_a_server_error]\n"
        'expected-statuses = ["2xx", "3xx", "4xx", "504"]\n'
        # schemathesis' own list plus 413: a body over a limit is refused before its other
        # fields are read (num_nodes over kernels.max_nodes beside a malformed method); a
        # 5xx there still fails not_a_server_error
        "[checks.negative_data_rejection]\n"
        'expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415",'
        ' "422", "428", "429", "5xx"]\n'
    )
    return path


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_the_whole_api_conforms_to_the_openapi_document(
    setup: str, start_agent: Callable[..., Agent], karate: dict[str, Any], tmp_path: Path
) -> None:
    sections = dict(SETUPS[setup])
    if setup == "token":
        _, _, coordinator = generate_keypair(tmp_path / "keys", name="coordinator")
        device_key, _, _ = generate_keypair(tmp_path / "keys", name="device")
        sections["device"] = {"private_key": str(device_key)}
        sections["sync"] = {"coordinator_public_key": coordinator}
    agent = start_agent(sections)
    if sections["http"].get("processes", 1) > 1:
        assert len(serving_pids(agent)) == sections["http"]["processes"] - 1
    assert agent.get("/outbox").json()["enabled"] == (setup == "token")
    if setup == "token":  # a queued result: /outbox and /status then show a kind's stats
        import jsonschema

        queued = agent.request("POST", "/diffuse?queue=1", json.dumps(karate).encode())
        assert queued.status == 200, queued.body
        schemas = agent.get("/openapi.json").json()["components"]["schemas"]
        jsonschema.validate(queued.json(), schemas["Diffusion"])
        assert "outbox_seq" in queued.json()
        assert agent.get("/outbox").json()["kinds"]["result"]["messages"] == 1
    registered = agent.request("PUT", "/graphs/karate", json.dumps(karate).encode())
    assert registered.status == 200, registered.body
    doc = agent.get("/openapi.json").json()
    assert ("security" in doc) == (setup == "token")
    config = _schemathesis_config(tmp_path / "schemathesis.toml", registered.json()["key"])
    argv = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"{agent.url}/openapi.json",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--max-examples",
        "10",
        "--seed",
        "20",
        "--request-timeout",
        "10",
    ]
    if setup == "token":
        argv += ["-H", f"Authorization: Bearer {TOKEN}"]
    run = subprocess.run(
        argv, check=False, capture_output=True, text=True, timeout=240, cwd=tmp_path
    )
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    assert re.search(rf"Selected: {OPERATIONS}/{OPERATIONS}", run.stdout), run.stdout[-3000:]
    assert "Stateful" in run.stdout
    assert agent.get("/healthz").status == 200
    failed = [e for e in agent.logs() if e.get("msg") == "request failed"]
    assert not failed, failed[:3]


def test_the_document_names_every_route_the_agent_registers() -> None:
    from dgdm.agent import http, oip
    from dgdm.agent.openapi import openapi_document

    registered = {(r.method.lower(), r.path) for r in (*http.ROUTES, *oip.ROUTES)}
    for token_required in (False, True):
        doc = openapi_document("0", http.GRAPH_ID.pattern, token_required=token_required)
        described = {(m, path) for path, ops in doc["paths"].items() for m in ops}
        assert described == registered
        ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
        assert len(set(ids)) == len(ids) == len(registered)
        unauthorized = {
            (m, p) for p, ops in doc["paths"].items() for m in ops if "401" in ops[m]["responses"]
        }
        open_paths = {("get", "/healthz"), ("get", "/v2/health/live"), ("get", "/v2/health/ready")}
        assert unauthorized == (registered - open_paths if token_required else set())
        assert ("securitySchemes" in doc["components"]) == token_required


def test_infer_answers_match_their_schemas(
    start_agent: Callable[..., Agent], karate: dict[str, Any]
) -> None:
    """What random generation rarely reaches: a well-formed infer, JSON and binary out."""
    import jsonschema

    agent = start_agent({"http": {"token": TOKEN}, "kernels": {"backend": "numpy"}})
    assert agent.request("PUT", "/graphs/karate", json.dumps(karate).encode()).status == 200
    doc = agent.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    op = doc["paths"]["/v2/models/{name}/infer"]["post"]
    x = [[0.5, 1.0, 2.0]] * 34
    tensor = {"name": "x", "datatype": "FP32", "shape": [2, 34, 3], "data": [x, x]}
    for binary in (False, True):
        body = {"id": "r1", "inputs": [tensor], "parameters": {"binary_data_output": binary}}
        jsonschema.validate(body, schemas["InferRequest"])
        answer = agent.post_json("/v2/models/karate/infer", body)
        assert answer.status == 200, answer.body
        content_type = answer.headers["Content-Type"].split(";")[0]
        assert content_type in op["responses"]["200"]["content"]
        length = int(answer.headers.get("Inference-Header-Content-Length", len(answer.body)))
        assert content_type == ("application/octet-stream" if binary else "application/json")
        jsonschema.validate(json.loads(answer.body[:length]), schemas["InferResponse"])
    meta = agent.get("/v2/models/karate").json()
    jsonschema.validate(meta, schemas["ModelMetadata"])
    assert meta["inputs"][0]["shape"] == [-1, 34, 3]


def test_the_documented_examples_succeed(start_agent: Callable[..., Agent]) -> None:
    """The examples phase above sends them; here each must be answered 200 in turn."""
    agent = start_agent({"kernels": {"backend": "numpy"}})
    doc = agent.get("/openapi.json").json()
    path = "/graphs/{graph_id}"
    graph_id = next(p["example"] for p in doc["paths"][path]["put"]["parameters"])
    steps = [
        ("PUT", path, "put"),
        ("POST", path + "/diffuse", "post"),
        ("PATCH", path, "patch"),
        ("POST", "/diffuse", "post"),
        ("DELETE", path, "delete"),
    ]
    for method, template, key in steps:
        op = doc["paths"][template][key]
        body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
        data = json.dumps(body["example"]).encode() if "example" in body else None
        answer = agent.request(method, template.replace("{graph_id}", graph_id), data)
        assert answer.status == 200, (method, template, answer.body)


def test_a_tiny_alpha_is_not_a_500(start_agent: Callable[..., Agent]) -> None:
    agent = start_agent({"kernels": {"backend": "numpy"}})
    answer = agent.post_json("/diffuse", {"x": [[1.0]], "method": {"alpha": 5e-324}})
    assert answer.status == 422, answer.body
    assert "method.alpha" in _strict_json(answer.body)["message"]


def _strict_json(body: bytes) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(body, parse_constant=refuse)


def test_features_past_float32_give_json_or_a_refusal(start_agent: Callable[..., Agent]) -> None:
    agent = start_agent({"kernels": {"backend": "numpy"}})
    answer = agent.post_json("/diffuse", {"x": [[1.0, 1e149]]})
    assert answer.status < 500, answer.body
    _strict_json(answer.body)
    assert answer.status == 422
    assert "float32" in _strict_json(answer.body)["message"]
