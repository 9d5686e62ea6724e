"""The OIP v2 infer codec against tritonclient's own request builder and response reader
(no network): every tensor tritonclient can send comes out bit for bit, every answer we
write reads back in tritonclient, and no byte string makes the parser fail any other way
than with an `OipRequestError`."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dgdm.agent.oip_codec import OipRequestError, encode_infer, parse_infer

finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
shapes = st.one_of(
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
    hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=4),
)
arrays = shapes.flatmap(lambda s: hnp.arrays(np.float32, s, elements=finite32))


def triton_body(
    x: np.ndarray, *, binary: bool, binary_output: bool | None = None, **params: object
) -> tuple[bytes, int | None]:
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = None
    if binary_output is not None:
        outputs = [triton.InferRequestedOutput("z", binary_data=binary_output)]
    body, json_size = triton.InferenceServerClient.generate_request_body(
        [tensor], outputs=outputs, request_id="r-1", parameters=params or None
    )
    return body, json_size


@settings(max_examples=60, deadline=None)
@given(x=arrays, binary=st.booleans(), binary_output=st.sampled_from([None, True, False]))
def test_tritonclient_requests_decode_bit_for_bit(
    x: np.ndarray, binary: bool, binary_output: bool | None
) -> None:
    body, json_size = triton_body(x, binary=binary, binary_output=binary_output)
    req = parse_infer(body, json_size)
    assert req.x.dtype == np.float32
    assert req.x.shape == x.shape
    assert req.x.tobytes() == x.tobytes()
    assert req.request_id == "r-1"
    # No outputs named: tritonclient asks for binary_data_output, as Triton defines.
    assert req.binary_output is (True if binary_output is None else binary_output)
    assert req.queue is False


@settings(max_examples=60, deadline=None)
@given(z=arrays, binary=st.booleans())
def test_answers_read_back_in_tritonclient(z: np.ndarray, binary: bool) -> None:
    body, length = encode_infer("club", "abc123", "r-9", z, binary=binary)
    assert (length is not None) is binary
    result = triton.InferResult.from_response_body(body, header_length=length)
    out = result.as_numpy("z")
    assert out.dtype == np.float32
    assert out.reshape(z.shape).tobytes() == z.tobytes()
    response = result.get_response()
    assert response["model_name"] == "club"
    assert response["model_version"] == "abc123"
    assert response["id"] == "r-9"
    assert response["outputs"][0]["shape"] == list(z.shape)


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=200), length=st.one_of(st.none(), st.integers(-5, 250)))
def test_any_bytes_decode_or_refuse_with_a_sentence(body: bytes, length: int | None) -> None:
    try:
        req = parse_infer(body, length)
    except OipRequestError as exc:
        assert str(exc)
    else:
        assert np.isfinite(req.x).all()


def test_nested_json_data_and_parameters() -> None:
    header = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2.5], [3, 4]]}],
        "outputs": [{"name": "z", "parameters": {"binary_data": False}}],
        "parameters": {"binary_data_output": True, "queue": True},
    }
    req = parse_infer(json.dumps(header).encode(), None)
    np.testing.assert_array_equal(req.x, [[1, 2.5], [3, 4]])
    assert req.binary_output is False  # the output's own flag wins over the request's
    assert req.queue is True


def _json_request(**tensor: object) -> bytes:
    base: dict[str, object] = {"name": "x", "datatype": "FP32", "shape": [2, 1], "data": [1, 2]}
    return json.dumps({"inputs": [{**base, **tensor}]}).encode()


@pytest.mark.parametrize(
    ("body", "length", "words"),
    [
        (b"{", None, "not valid JSON"),
        (b"[]", None, "JSON object"),
        (b'{"inputs": []}', None, "exactly one tensor"),
        (_json_request(name="y"), None, "unknown input 'y'"),
        (_json_request(datatype="FP64"), None, "must be FP32"),
        (_json_request(shape=[2]), None, "shape must be [N, F] or [B, N, F]"),
        (_json_request(shape=[2, 0]), None, "shape must be"),
        (_json_request(shape=[2, True]), None, "shape must be"),
        (_json_request(data=[1, 2, 3]), None, "holds 3 numbers but shape [2, 1] needs 2"),
        (_json_request(data=[1, "2"]), None, "numbers only"),
        (_json_request(data=[True, 2]), None, "numbers only"),
        (_json_request(data=[[1], [2, 3]]), None, "holds 3 numbers"),
        (_json_request(data=[1, 1e300]), None, "finite"),
        (_json_request(data=[1, 10**400]), None, "too large"),
        (_json_request(data=None), None, "needs data"),
        (_json_request(parameters={"binary_data_size": 8}), None, "no Inference-Header"),
    ],
)
def test_malformed_requests_name_what_is_wrong(body: bytes, length: int | None, words: str) -> None:
    with pytest.raises(OipRequestError, match=re.escape(words)):
        parse_infer(body, length)


def test_binary_sizes_that_do_not_add_up() -> None:
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    body, json_size = triton_body(x, binary=True)
    assert json_size is not None
    with pytest.raises(OipRequestError, match="binary tensor data is 20 bytes"):
        parse_infer(body[:-4], json_size)
    with pytest.raises(OipRequestError, match="binary tensor data is 28 bytes"):
        parse_infer(body + b"\0" * 4, json_size)
    with pytest.raises(OipRequestError, match="outside the body"):
        parse_infer(body, len(body) + 1)
    header = body[:json_size].replace(b'"binary_data_size":24', b'"binary_data_size":20')
    with pytest.raises(OipRequestError, match="needs 24 bytes"):
        parse_infer(header + body[json_size:-4], len(header))
    with pytest.raises(OipRequestError, match="declares no binary_data_size"):
        parse_infer(_json_request() + b"\0\0\0\0", len(_json_request()))
    nan = np.full((3, 2), np.nan, dtype=np.float32)
    with pytest.raises(OipRequestError, match="finite"):
        parse_infer(*triton_body(nan, binary=True))


def test_unknown_output_and_bad_flags() -> None:
    x = np.ones((2, 2), dtype=np.float32)
    tensor = triton.InferInput("x", [2, 2], "FP32")
    tensor.set_data_from_numpy(x, binary_data=False)
    body, _ = triton.InferenceServerClient.generate_request_body(
        [tensor], outputs=[triton.InferRequestedOutput("w")]
    )
    with pytest.raises(OipRequestError, match="unknown output 'w'"):
        parse_infer(body, None)
    body, _ = triton.InferenceServerClient.generate_request_body(
        [tensor], parameters={"queue": "yes"}
    )
    with pytest.raises(OipRequestError, match="queue must be true or false"):
        parse_infer(body, None)


def test_large_batch_round_trip_size() -> None:
    x = np.random.default_rng(1).random((64, 100, 16), dtype=np.float32)
    body, json_size = triton_body(x, binary=True)
    assert json_size is not None
    assert len(body) - json_size == math.prod(x.shape) * 4
    assert parse_infer(body, json_size).x.tobytes() == x.tobytes()
