"""`/openapi.json` describes the Open Inference Protocol routes (SPEC §4.1) as the agent
answers them: schemathesis (`run --checks all`, its coverage, fuzzing and stateful phases)
against a live agent with a token and a registered topology finds no failure and no 5xx.

Limits of what this proves, on purpose:
- Only the `/v2` operations are run; the §4 routes' descriptions are still loose (their
  bodies have no schemas yet).
- `positive_data_acceptance` is excluded: JSON Schema cannot say that an input's N is the
  model's node count or that `data` holds B x N x F numbers, so schema-valid requests are
  rightly refused with 400.
- Binary bodies (`application/octet-stream`, the binary tensor extension) are only fuzzed
  with random bytes here (every one must be refused below 500); a well-formed binary
  request needs the JSON header's length in a header, which schemathesis cannot derive.
  test_oip.py drives the binary extension with tritonclient.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("schemathesis")

TOKEN = "openapi-token"
Agent = Any  # conftest.AgentProcess


def test_v2_routes_conform_to_the_openapi_document(
    start_agent: Callable[..., Agent], karate: dict[str, Any], tmp_path: Path
) -> None:
    oip_agent = start_agent({"http": {"token": TOKEN}, "kernels": {"backend": "numpy"}})
    registered = oip_agent.request("PUT", "/graphs/karate", json.dumps(karate).encode())
    assert registered.status == 200, registered.body
    version = registered.json()["key"]
    # Most generated requests should reach a model: its name and version fixed.
    config = tmp_path / "schemathesis.toml"
    config.write_text(f'[parameters]\n"path.name" = "karate"\n"path.version" = "{version}"\n')
    argv = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"{oip_agent.url}/openapi.json",
        "--include-path-regex",
        "^/v2",
        "-H",
        f"Authorization: Bearer {TOKEN}",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--max-examples",
        "15",
        "--seed",
        "20",
        "--request-timeout",
        "10",
    ]
    run = subprocess.run(
        argv, check=False, capture_output=True, text=True, timeout=240, cwd=tmp_path
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "9 selected" in run.stdout  # every /v2 operation was described and run
    assert oip_agent.get("/healthz").status == 200


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
