"""Open Inference Protocol v2 infer bodies (SPEC §4.1) for the one input `x` and output `z`.

Pure: bytes and the `Inference-Header-Content-Length` value in, a checked `InferRequest`
out; a result array in, response bytes and their header length out. The binary tensor
extension (Triton's `binary_tensor_data`) puts a JSON header first and the raw little-endian
tensors after it, each input's size in its `parameters.binary_data_size`. Every refusal is
an `OipRequestError` whose sentence names what is wrong (the client shows it to its user).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from dgdm.agent.errors import BadJson
from dgdm.agent.jsonio import dumps, loads

INPUT = "x"
OUTPUT = "z"
DATATYPE = "FP32"
_WIRE_DTYPE = np.dtype("<f4")
_NUMBERS = (int, float)
# A binary request's JSON header is the same bytes request after request (one client, one
# shape): headers up to this size are checked once and remembered (MAX_HEADERS of them).
CACHED_HEADER_BYTES = 1024
MAX_HEADERS = 256


class OipRequestError(ValueError):
    """A malformed infer request; the message is the sentence the client is shown."""


@dataclass(frozen=True)
class InferRequest:
    """A checked request: `x` float32 (N, F) or (B, N, F), finite."""

    x: np.ndarray
    request_id: str | None
    binary_output: bool
    queue: bool


def parse_infer(body: bytes, header_length: int | None) -> InferRequest:
    """Decode an infer body; `header_length` is the JSON header's size when the body
    carries binary tensors after it (None: the body is all JSON)."""
    if header_length is None:
        header, tail = body, b""
    else:
        if not 0 < header_length <= len(body):
            raise OipRequestError(
                f"Inference-Header-Content-Length {header_length} is outside the body's "
                f"{len(body)} bytes"
            )
        header, tail = body[:header_length], body[header_length:]
    binary = header_length is not None
    if binary and len(header) <= CACHED_HEADER_BYTES:
        checked = _remembered_header(header)
    else:
        checked = _header(header, binary_allowed=binary)
    return InferRequest(
        x=_input_data(checked, tail),
        request_id=checked.request_id,
        binary_output=checked.binary_output,
        queue=checked.queue,
    )


@dataclass(frozen=True)
class _Header:
    """An infer request's JSON header, checked: everything but the tensor's data."""

    shape: tuple[int, ...]
    binary_size: int | None  # None: the data is in the header, `data`
    data: Any
    request_id: str | None
    binary_output: bool
    queue: bool


def _header(header: bytes, *, binary_allowed: bool) -> _Header:
    obj = _decode(header)
    params = _parameters(obj.get("parameters"), "request parameters")
    shape, size, data = _input_tensor(obj.get("inputs"), binary_allowed=binary_allowed)
    return _Header(
        shape=shape,
        binary_size=size,
        data=data,
        request_id=_request_id(obj.get("id")),
        binary_output=_binary_output(obj.get("outputs"), params),
        queue=_flag(params, "queue", "request parameters"),
    )


@functools.lru_cache(maxsize=MAX_HEADERS)
def _remembered_header(header: bytes) -> _Header:
    """`_header` of a binary request, once per distinct header (a refusal is not kept)."""
    return _header(header, binary_allowed=True)


def encode_infer(
    model_name: str,
    model_version: str,
    request_id: str | None,
    z: np.ndarray,
    *,
    binary: bool,
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """The infer response body and, for a binary `z`, the JSON header's length."""
    raw = np.ascontiguousarray(z, dtype=_WIRE_DTYPE)
    if binary and not parameters:
        header = _binary_answer_header(model_name, model_version, request_id, z.shape)
        return b"".join((header, raw.data)), len(header)  # one copy of z, not two
    output: dict[str, Any] = {"name": OUTPUT, "datatype": DATATYPE, "shape": list(z.shape)}
    if binary:
        output["parameters"] = {"binary_data_size": raw.nbytes}
    else:
        output["data"] = raw.reshape(-1)
    header = _answer_header(model_name, model_version, request_id, parameters, output)
    if not binary:
        return header, None
    return b"".join((header, raw.data)), len(header)  # one copy of z, not two


def _answer_header(
    model_name: str,
    model_version: str,
    request_id: str | None,
    parameters: dict[str, Any] | None,
    output: dict[str, Any],
) -> bytes:
    answer: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        answer["id"] = request_id
    if parameters:
        answer["parameters"] = parameters
    answer["outputs"] = [output]
    return dumps(answer)


@functools.lru_cache(maxsize=MAX_HEADERS)
def _binary_answer_header(
    model_name: str, model_version: str, request_id: str | None, shape: tuple[int, ...]
) -> bytes:
    """A binary answer's header, the same bytes answer after answer (one model, one shape)."""
    size = math.prod(shape) * _WIRE_DTYPE.itemsize
    output: dict[str, Any] = {"name": OUTPUT, "datatype": DATATYPE, "shape": list(shape)}
    output["parameters"] = {"binary_data_size": size}
    return _answer_header(model_name, model_version, request_id, None, output)


def error_body(sentence: str) -> bytes:
    """The protocol's error form: `{"error": "<sentence>"}`."""
    return dumps({"error": sentence})


# -- request parts ------------------------------------------------------------------------


def _decode(header: bytes) -> dict[str, Any]:
    try:
        obj = loads(header)
    except BadJson as exc:
        raise OipRequestError(f"the inference header is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise OipRequestError("the inference header must be a JSON object")
    return obj


def _request_id(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise OipRequestError("id must be a string")


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise OipRequestError(f"{where} must be a JSON object")
    return value


def _flag(params: dict[str, Any], name: str, where: str) -> bool:
    value = params.get(name, False)
    if not isinstance(value, bool):
        raise OipRequestError(f"{where}: {name} must be true or false")
    return value


def _input_tensor(inputs: Any, *, binary_allowed: bool) -> tuple[tuple[int, ...], int | None, Any]:
    """The one input's shape, binary size (None: JSON data) and JSON data, checked as far as
    the header alone allows."""
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise OipRequestError(f"inputs must be a list of exactly one tensor, {INPUT}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT:
        raise OipRequestError(f"unknown input {tensor.get('name')!r}: this model takes {INPUT}")
    if tensor.get("datatype") != DATATYPE:
        raise OipRequestError(f"input {INPUT} must be {DATATYPE}, not {tensor.get('datatype')!r}")
    shape = _shape(tensor.get("shape"))
    params = _parameters(tensor.get("parameters"), f"input {INPUT} parameters")
    size = params.get("binary_data_size")
    if size is None:
        return shape, None, tensor.get("data")
    if not binary_allowed:
        raise OipRequestError(
            f"input {INPUT} declares binary_data_size but the request has no "
            "Inference-Header-Content-Length"
        )
    expected = math.prod(shape) * _WIRE_DTYPE.itemsize
    if type(size) is not int or size != expected:
        raise OipRequestError(
            f"input {INPUT} binary_data_size is {size!r} but shape {list(shape)} of "
            f"{DATATYPE} needs {expected} bytes"
        )
    return shape, size, None


def _input_data(header: _Header, tail: bytes) -> np.ndarray:
    """The input tensor from the header's JSON data or the binary tail."""
    if header.binary_size is None:
        if tail:
            raise OipRequestError(
                f"the body has {len(tail)} bytes after the header but input {INPUT} "
                "declares no binary_data_size"
            )
        x = _json_data(header.data, header.shape)
    else:
        if len(tail) != header.binary_size:
            raise OipRequestError(
                f"the binary tensor data is {len(tail)} bytes but binary_data_size says "
                f"{header.binary_size}"
            )
        x = np.frombuffer(tail, dtype=_WIRE_DTYPE).astype(np.float32).reshape(header.shape)
    if not np.isfinite(x).all():
        raise OipRequestError(f"input {INPUT} must hold finite FP32 numbers only")
    return x


def _shape(value: Any) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or len(value) not in (2, 3)
        or not all(type(d) is int and d >= 1 for d in value)
    ):
        raise OipRequestError(
            f"input {INPUT} shape must be [N, F] or [B, N, F] of positive integers, not {value!r}"
        )
    return tuple(value)


def _json_data(data: Any, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(data, list):
        raise OipRequestError(f"input {INPUT} needs data (a list of numbers) or binary data")
    flat = _flatten(data, depth=len(shape))
    if len(flat) != math.prod(shape):
        raise OipRequestError(
            f"input {INPUT} data holds {len(flat)} numbers but shape {list(shape)} needs "
            f"{math.prod(shape)}"
        )
    try:
        with np.errstate(over="ignore"):  # too large for float32 becomes inf, refused as such
            return np.array(flat, dtype=np.float64).astype(np.float32).reshape(shape)
    except OverflowError as exc:
        raise OipRequestError(f"input {INPUT} holds a number too large for FP32") from exc


def _flatten(data: list[Any], depth: int) -> list[Any]:
    """Row-major numbers from a flat list (what tritonclient sends) or nested lists."""
    if all(type(v) in _NUMBERS for v in data):
        return data
    if depth <= 1 or not all(type(v) is list for v in data):
        raise OipRequestError(f"input {INPUT} data must hold numbers only")
    return [v for row in data for v in _flatten(row, depth - 1)]


def _binary_output(outputs: Any, params: dict[str, Any]) -> bool:
    default = _flag(params, "binary_data_output", "request parameters")
    if outputs is None:
        return default
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise OipRequestError("outputs must be a list of objects")
    binary = default
    for output in outputs:
        if output.get("name") != OUTPUT:
            raise OipRequestError(
                f"unknown output {output.get('name')!r}: this model returns {OUTPUT}"
            )
        out_params = _parameters(output.get("parameters"), f"output {OUTPUT} parameters")
        if "binary_data" in out_params:
            binary = _flag(out_params, "binary_data", f"output {OUTPUT} parameters")
    return binary
