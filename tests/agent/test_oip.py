"""The Open Inference Protocol v2 on a real agent process, driven by the real tritonclient
(sync over geventhttpclient, and the aiohttp-based aio client): health, metadata, infer with
binary and JSON tensors for [N, F] and [B, N, F], numerics equal to `/graphs/{id}/diffuse`,
versions across a PATCH, the protocol's error form for every refusal, the bearer token,
and `parameters.queue` committing one outbox result per feature set."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from tritonclient.utils import InferenceServerException

from dgdm.sync.crypto import generate_keypair

Agent = Any  # conftest.AgentProcess
RING = 12


def ring(graph_id: str, n: int = RING) -> dict[str, Any]:
    """A topology without features (compact form): metadata says F = -1."""
    edges = [list(range(n)), [(i + 1) % n for i in range(n)]]
    return {"graph_id": graph_id, "num_nodes": n, "edge_index": edges}


def register(agent: Agent, graph: dict[str, Any]) -> str:
    put = agent.request("PUT", f"/graphs/{graph['graph_id']}", json.dumps(graph).encode())
    assert put.status == 200, put.body
    return str(put.json()["key"])


def reference(agent: Agent, graph_id: str, x: np.ndarray) -> np.ndarray:
    """What the JSON endpoint answers for the same features."""
    answer = agent.post_json(f"/graphs/{graph_id}/diffuse", {"x": x.tolist()})
    assert answer.status == 200, answer.body
    return np.array(answer.json()["embedding"], dtype=np.float32)


def client(agent: Agent, **kw: Any) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(f"127.0.0.1:{agent.port}", **kw)


def infer_input(x: np.ndarray, binary: bool, datatype: str = "FP32") -> triton.InferInput:
    tensor = triton.InferInput("x", list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def refusal(call: Any) -> tuple[int, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    return int(info.value.status()), str(info.value.message())


@pytest.fixture(scope="module")
def models(shared_agent: Agent) -> dict[str, str]:
    return {"ring": register(shared_agent, ring("ring"))}


def test_server_health_and_metadata(shared_agent: Agent) -> None:
    c = client(shared_agent)
    assert c.is_server_live()
    assert c.is_server_ready()
    meta = c.get_server_metadata()
    assert meta["name"] == "dgdm"
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata_versions_and_ready(shared_agent: Agent, models: dict[str, str]) -> None:
    c = client(shared_agent)
    version = models["ring"]
    meta = c.get_model_metadata("ring")
    assert meta["versions"] == [version]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, RING, -1]}]
    assert meta["outputs"] == [{"name": "z", "datatype": "FP32", "shape": [-1, RING, -1]}]
    assert c.get_model_metadata("ring", version)["versions"] == [version]
    assert c.is_model_ready("ring")
    assert c.is_model_ready("ring", version)
    assert not c.is_model_ready("ring", "0" * 64)
    assert not c.is_model_ready("nope")
    status, message = refusal(lambda: c.get_model_metadata("nope"))
    assert status == 404
    assert "unknown model 'nope'" in message


def test_metadata_uses_the_registered_feature_width(shared_agent: Agent, karate: Any) -> None:
    register(shared_agent, {**karate, "graph_id": "club-width"})
    c = client(shared_agent)
    meta = c.get_model_metadata("club-width")
    assert meta["inputs"][0]["shape"] == [-1, 34, 3]
    assert meta["outputs"][0]["shape"] == [-1, 34, 3]
    x = np.ones((34, 5), dtype=np.float32)  # not the width the metadata promises
    status, message = refusal(lambda: c.infer("club-width", [infer_input(x, True)]))
    assert status == 400
    assert "F = 5" in message
    assert "takes 3" in message


@pytest.mark.parametrize(("binary_in", "binary_out"), [(True, True), (False, False), (True, False)])
def test_infer_matches_the_registered_diffuse(
    shared_agent: Agent, models: dict[str, str], binary_in: bool, binary_out: bool
) -> None:
    c = client(shared_agent)
    rng = np.random.default_rng(4)
    x = rng.random((RING, 5), dtype=np.float32)
    outputs = [triton.InferRequestedOutput("z", binary_data=binary_out)]
    result = c.infer("ring", [infer_input(x, binary_in)], outputs=outputs, request_id="q1")
    response = result.get_response()
    assert response["model_name"] == "ring"
    assert response["model_version"] == models["ring"]
    assert response["id"] == "q1"
    assert ("data" in response["outputs"][0]) is not binary_out
    z = result.as_numpy("z").reshape(RING, 5)
    np.testing.assert_allclose(z, reference(shared_agent, "ring", x), rtol=1e-5, atol=1e-6)


def test_batch_of_feature_sets_and_default_binary_output(
    shared_agent: Agent, models: dict[str, str]
) -> None:
    xs = np.random.default_rng(5).random((4, RING, 3), dtype=np.float32)
    before = _oip_diffusions(shared_agent)
    result = client(shared_agent).infer("ring", [infer_input(xs, True)], model_version="")
    assert _oip_diffusions(shared_agent) == before + 4  # one per feature set, one call
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] == xs.nbytes
    z = result.as_numpy("z")
    assert z.shape == xs.shape
    for b in range(4):
        expected = reference(shared_agent, "ring", xs[b])
        np.testing.assert_allclose(z[b], expected, rtol=1e-5, atol=1e-6)


def _oip_diffusions(agent: Agent) -> float:
    text = agent.get("/metrics").body.decode()
    found = re.findall(r'^dgdm_diffusions_total\{[^}]*source="oip"[^}]*\} (\S+)$', text, re.M)
    return sum(float(v) for v in found)


async def test_async_client_concurrent_requests(
    shared_agent: Agent, models: dict[str, str]
) -> None:
    xs = np.random.default_rng(6).random((16, RING, 2), dtype=np.float32)
    async with triton_aio.InferenceServerClient(f"127.0.0.1:{shared_agent.port}") as c:
        assert await c.is_server_ready()
        assert (await c.get_model_metadata("ring"))["versions"] == [models["ring"]]
        results = await asyncio.gather(
            *(c.infer("ring", [infer_input(x, binary=i % 2 == 0)]) for i, x in enumerate(xs))
        )
    for x, result in zip(xs, results, strict=True):
        expected = reference(shared_agent, "ring", x)
        np.testing.assert_allclose(result.as_numpy("z"), expected, rtol=1e-5, atol=1e-6)


def test_refusals_in_the_protocol_form(shared_agent: Agent, models: dict[str, str]) -> None:
    c = client(shared_agent)
    x = np.ones((RING, 2), dtype=np.float32)
    cases = [
        (lambda: c.infer("ring", [infer_input(x.astype(np.float64), True, "FP64")]), "FP32"),
        (lambda: c.infer("ring", [infer_input(np.ones(RING, np.float32), True)]), "shape"),
        (lambda: c.infer("ring", [infer_input(np.ones((RING + 1, 2), np.float32), True)]), "N"),
    ]
    for call, words in cases:
        status, message = refusal(call)
        assert (status, words in message) == (400, True), message
    status, message = refusal(lambda: c.infer("nope", [infer_input(x, True)]))
    assert (status, "unknown model 'nope'" in message) == (404, True)
    status, message = refusal(lambda: c.infer("ring", [infer_input(x, True)], model_version="1"))
    assert (status, "has no version '1'" in message) == (404, True)


def test_old_version_answers_404_after_a_patch(shared_agent: Agent) -> None:
    old = register(shared_agent, ring("patched"))
    c = client(shared_agent)
    x = np.ones((RING, 1), dtype=np.float32)
    assert c.infer("patched", [infer_input(x, True)], model_version=old)
    patch = json.dumps({"add": [{"source": 0, "target": 6}]}).encode()
    assert shared_agent.request("PATCH", "/graphs/patched", patch).status == 200
    new = c.get_model_metadata("patched")["versions"][0]
    assert new != old
    status, _ = refusal(lambda: c.infer("patched", [infer_input(x, True)], model_version=old))
    assert status == 404
    assert not c.is_model_ready("patched", old)
    result = c.infer("patched", [infer_input(x, True)])
    assert result.get_response()["model_version"] == new
    expected = reference(shared_agent, "patched", x)
    np.testing.assert_allclose(result.as_numpy("z"), expected, rtol=1e-5, atol=1e-6)


def _raw_infer(agent: Agent, header: dict[str, Any], tail: bytes = b"", **kw: Any) -> Any:
    head = json.dumps(header).encode()
    headers = {"Inference-Header-Content-Length": str(len(head))} if tail else {}
    return agent.request("POST", "/v2/models/ring/infer", head + tail, headers=headers, **kw)


def _header(shape: list[int], **tensor: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": shape, **tensor}]}


def test_raw_bodies_sizes_and_content_types(shared_agent: Agent, models: dict[str, str]) -> None:
    x = np.ones((RING, 2), dtype=np.float32)
    sized = _header([RING, 2], parameters={"binary_data_size": x.nbytes})
    short = _raw_infer(shared_agent, sized, x.tobytes()[:-4])
    assert short.status == 400
    assert "binary tensor data is" in short.json()["error"]
    assert set(short.json()) == {"error"}
    ok = _raw_infer(shared_agent, sized, x.tobytes())
    assert ok.status == 200
    assert ok.headers["Content-Type"].startswith("application/json")
    body = json.dumps(_header([RING, 2], data=x.ravel().tolist())).encode()
    as_json = shared_agent.request("POST", "/v2/models/ring/infer", body)
    assert as_json.status == 200
    assert as_json.json()["model_version"] == models["ring"]
    octet = shared_agent.request(
        "POST", "/v2/models/ring/infer", body, content_type="application/octet-stream"
    )
    assert octet.status == 200  # what tritonclient.http.aio sends for a JSON-only body
    # What a web page can send a loopback agent without a preflight is refused.
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        page = shared_agent.request("POST", "/v2/models/ring/infer", body, content_type=kind)
        assert page.status == 400
        assert "unsupported content type" in page.json()["error"]
    evil = {"Origin": "http://evil.example"}
    cross = shared_agent.request("POST", "/v2/models/ring/infer", body, headers=evil)
    assert (cross.status, "cross-site" in cross.json()["error"]) == (400, True)
    same = {"Origin": shared_agent.url}
    assert shared_agent.request("POST", "/v2/models/ring/infer", body, headers=same).status == 200
    nan = _raw_infer(shared_agent, sized, np.full_like(x, np.nan).tobytes())
    assert nan.status == 400
    assert "finite" in nan.json()["error"]
    unknown = shared_agent.get("/v2/nothing-here")
    assert (unknown.status, set(unknown.json())) == (404, {"error"})
    wrong = shared_agent.request("DELETE", "/v2/health/live")
    assert (wrong.status, set(wrong.json())) == (405, {"error"})
    assert shared_agent.get("/healthz").status == 200


def test_token_and_body_limit(start_agent: Any) -> None:
    agent = start_agent(
        {"http": {"token": "oip-token", "max_body_bytes": 4096}, "kernels": {"backend": "numpy"}}
    )
    register(agent, ring("ring"))
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert agent.get(path, headers={"Authorization": ""}).status == 200
    for path in ("/v2", "/v2/models/ring", "/v2/models/ring/ready"):
        denied = agent.get(path, headers={"Authorization": "Bearer wrong"})
        assert denied.status == 401
        assert denied.json() == {"error": "a valid bearer token is required"}
    for path in ("/v2/health/live", "/v2"):
        rebound = agent.get(path, headers={"Host": "evil.example", "Authorization": ""})
        assert rebound.status == 421
        assert set(rebound.json()) == {"error"}
    anonymous = client(agent)
    assert anonymous.is_server_live()
    status, message = refusal(lambda: anonymous.get_model_metadata("ring"))
    assert (status, message) == (401, "a valid bearer token is required")
    authed = client(agent)
    headers = {"Authorization": "Bearer oip-token"}
    x = np.ones((RING, 4), dtype=np.float32)
    result = authed.infer("ring", [infer_input(x, True)], headers=headers)
    assert result.as_numpy("z").shape == (RING, 4)
    big = np.ones((2, RING, 100), dtype=np.float32)  # 9.6 KB of binary data
    status, message = refusal(
        lambda: authed.infer("ring", [infer_input(big, True)], headers=headers)
    )
    assert status == 413
    assert "http.max_body_bytes" in message


def test_queue_commits_one_result_per_feature_set(start_agent: Any, tmp_path: Any) -> None:
    _, _, coord_pub = generate_keypair(tmp_path / "keys", name="coordinator")
    device_key, _, _ = generate_keypair(tmp_path / "keys", name="device")
    agent = start_agent(
        {
            "device": {"private_key": str(device_key)},
            "sync": {"coordinator_public_key": coord_pub},
            "kernels": {"backend": "numpy"},
        }
    )
    register(agent, ring("ring"))
    xs = np.random.default_rng(8).random((3, RING, 2), dtype=np.float32)
    result = client(agent).infer("ring", [infer_input(xs, True)], parameters={"queue": True})
    seqs = result.get_response()["parameters"]["outbox_seq"]
    assert len(set(seqs)) == 3
    outbox = agent.get("/outbox").json()
    assert outbox["kinds"]["result"]["messages"] == 3
    plain = client(agent).infer("ring", [infer_input(xs[0], True)])
    assert "parameters" not in plain.get_response()
    assert agent.get("/outbox").json()["kinds"]["result"]["messages"] == 3
