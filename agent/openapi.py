"""The OpenAPI description of the local HTTP endpoint, served at `/openapi.json` (SPEC §4).

Every operation may answer a refusal: a JSON `{"error", "message"}` with a 4xx status, or
503 (busy, retry) / 507 (the disk is full); under `/v2` (the Open Inference Protocol, SPEC
§4.1, agent/oip.py) the protocol's `{"error": "<sentence>"}` instead.
"""

from __future__ import annotations

from typing import Any


def _op(
    summary: str,
    *,
    body: bool = False,
    queue: bool = False,
    gid: str | None = None,
) -> dict[str, Any]:
    """One operation; `gid` is the graph id pattern when the path has one."""
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {}}},
            "default": {"$ref": "#/components/responses/Error"},
        },
    }
    params = []
    if gid:
        params.append(_param("graph_id", "path", {"type": "string", "pattern": gid}))
    if queue:
        params.append(_param("queue", "query", {"type": "string", "enum": ["0", "1"]}))
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": {}}}}
    return op


def _param(name: str, where: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path", "schema": schema}


def openapi_document(version: str, graph_id_pattern: str) -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "dgdm-edge agent", "version": version},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": OIP_SCHEMAS,
            "responses": {
                "OipError": {
                    "description": "A refusal on a /v2 path (400, 401, 404, 405, 413, 421, 503)",
                    "content": {"application/json": {"schema": _ref("OipError")}},
                },
                "Error": {
                    "description": "A refusal",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["error", "message"],
                                "properties": {
                                    "error": {"type": "string"},
                                    "message": {"type": "string"},
                                },
                            }
                        }
                    },
                },
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": {**_op("Liveness and readiness"), "security": []}},
            "/status": {"get": _op("Device, backend, TPU, broker and outbox state")},
            "/metrics": {"get": _op("Prometheus metrics")},
            "/tpu": {"get": _op("Edge TPU state and backends")},
            "/outbox": {"get": _op("Outbox depth, bytes and oldest age per kind")},
            "/diffuse": {"post": _op("Diffuse a graph (SPEC §3)", body=True, queue=True)},
            "/graphs": {"get": _op("Registered topologies")},
            "/graphs/{graph_id}": {
                "put": _op("Register a topology", body=True, gid=graph_id_pattern),
                "patch": _op("Add, remove or reweight edges", body=True, gid=graph_id_pattern),
                "delete": _op("Forget a topology", gid=graph_id_pattern),
            },
            "/graphs/{graph_id}/diffuse": {
                "post": _op(
                    "Diffuse features {x} on a registered topology",
                    body=True,
                    queue=True,
                    gid=graph_id_pattern,
                )
            },
            **_oip_paths(graph_id_pattern),
        },
    }


# -- the Open Inference Protocol v2 (SPEC §4.1) --------------------------------------------

_HEADER_LENGTH = "Inference-Header-Content-Length"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    """An answer's schema: exactly these properties."""
    return {
        "type": "object",
        "required": required,
        "properties": properties,
        "additionalProperties": False,
    }


_STRING = {"type": "string"}
_TRUE = {"type": "boolean", "enum": [True]}
_SHAPE = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}
_TENSOR_METADATA = _object(
    ["name", "datatype", "shape"],
    # shape: [-1, N, F] (any B), F = -1 unless the topology was registered with features
    {"name": _STRING, "datatype": {"type": "string", "enum": ["FP32"]}, "shape": _SHAPE},
)
OIP_SCHEMAS: dict[str, Any] = {
    "OipError": _object(["error"], {"error": _STRING}),
    "ServerMetadata": _object(
        ["name", "version", "extensions"],
        {"name": _STRING, "version": _STRING, "extensions": {"type": "array", "items": _STRING}},
    ),
    "Live": _object(["live"], {"live": _TRUE}),
    "Ready": _object(["ready"], {"ready": _TRUE}),
    "ModelMetadata": _object(
        ["name", "versions", "platform", "inputs", "outputs"],
        {
            "name": _STRING,
            "versions": {"type": "array", "items": _STRING, "minItems": 1, "maxItems": 1},
            "platform": {"type": "string", "enum": ["dgdm"]},
            "inputs": {"type": "array", "items": _TENSOR_METADATA, "minItems": 1, "maxItems": 1},
            "outputs": {"type": "array", "items": _TENSOR_METADATA, "minItems": 1, "maxItems": 1},
        },
    ),
    "ModelReady": _object(
        ["name", "version", "ready"], {"name": _STRING, "version": _STRING, "ready": _TRUE}
    ),
    # What a client sends: unknown members are ignored, as OIP servers do. N must be the
    # model's node count and `data` hold B x N x F finite numbers (row-major, flat or
    # nested); JSON Schema cannot say either, the agent answers 400 naming what is wrong.
    "InferRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": _STRING,
            "parameters": {
                "type": "object",
                "properties": {
                    "binary_data_output": {"type": "boolean"},
                    "queue": {"type": "boolean"},
                },
            },
            "inputs": {
                "type": "array",
                "minItems": 1,
                "maxItems": 1,
                "items": {
                    "type": "object",
                    "required": ["name", "datatype", "shape"],
                    "properties": {
                        "name": {"type": "string", "enum": ["x"]},
                        "datatype": {"type": "string", "enum": ["FP32"]},
                        "shape": {**_SHAPE, "items": {"type": "integer", "minimum": 1}},
                        "data": {"type": "array"},
                        "parameters": {
                            "type": "object",
                            "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
                        },
                    },
                },
            },
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": _STRING,
                        "parameters": {
                            "type": "object",
                            "properties": {"binary_data": {"type": "boolean"}},
                        },
                    },
                },
            },
        },
    },
    "InferResponse": _object(
        ["model_name", "model_version", "outputs"],
        {
            "model_name": _STRING,
            "model_version": _STRING,
            "id": _STRING,
            # parameters.queue: the outbox sequence number of each feature set's result
            "parameters": _object(
                ["outbox_seq"], {"outbox_seq": {"type": "array", "items": {"type": "integer"}}}
            ),
            "outputs": {
                "type": "array",
                "minItems": 1,
                "maxItems": 1,
                "items": _object(
                    ["name", "datatype", "shape"],
                    {
                        "name": {"type": "string", "enum": ["z"]},
                        "datatype": {"type": "string", "enum": ["FP32"]},
                        "shape": {**_SHAPE, "items": {"type": "integer", "minimum": 1}},
                        "data": {"type": "array", "items": {"type": "number"}},
                        "parameters": _object(
                            ["binary_data_size"],
                            {"binary_data_size": {"type": "integer", "minimum": 0}},
                        ),
                    },
                ),
            },
        },
    ),
}
_BINARY = {
    "application/octet-stream": {
        "schema": {
            "type": "string",
            "format": "binary",
            "description": (
                "The binary tensor extension: an InferRequest / InferResponse JSON header of "
                f"{_HEADER_LENGTH} bytes, then each binary tensor's raw little-endian FP32 "
                "bytes (its parameters.binary_data_size)"
            ),
        }
    }
}


def _oip_op(
    summary: str,
    answer: str,
    *,
    gid: str | None = None,
    version: bool = False,
    open_: bool = False,
) -> dict[str, Any]:
    """One /v2 operation; `gid` is the graph id pattern of its model name."""
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": _ref(answer)}}},
            "default": {"$ref": "#/components/responses/OipError"},
        },
    }
    params = []
    if gid:
        params.append(_param("name", "path", {"type": "string", "pattern": gid}))
    if version:
        params.append(_param("version", "path", {"type": "string", "minLength": 1}))
    if params:
        op["parameters"] = params
    if open_:
        op["security"] = []
    return op


def _infer(version: bool, graph_id_pattern: str) -> dict[str, Any]:
    op = _oip_op(
        "Diffuse x [N, F] or [B, N, F] on the model's topology; z has the same shape",
        "InferResponse",
        gid=graph_id_pattern,
        version=version,
    )
    op["parameters"].append(
        {
            "name": _HEADER_LENGTH,
            "in": "header",
            "required": False,
            "description": "With the binary tensor extension: the JSON header's length",
            "schema": {"type": "integer", "minimum": 1},
        }
    )
    op["requestBody"] = {
        "required": True,
        "description": "No Content-Type is taken as JSON (tritonclient sends none)",
        "content": {"application/json": {"schema": _ref("InferRequest")}, **_BINARY},
    }
    op["responses"]["200"]["content"].update(_BINARY)
    op["responses"]["200"]["headers"] = {
        _HEADER_LENGTH: {
            "description": "The JSON header's length, when z is binary",
            "schema": {"type": "integer", "minimum": 1},
        }
    }
    return op


def _oip_paths(graph_id_pattern: str) -> dict[str, Any]:
    def model(summary: str, answer: str, version: bool = False) -> dict[str, Any]:
        return {"get": _oip_op(summary, answer, gid=graph_id_pattern, version=version)}

    base = "/v2/models/{name}"
    versioned = base + "/versions/{version}"
    return {
        "/v2": {"get": _oip_op("Server metadata", "ServerMetadata")},
        "/v2/health/live": {"get": _oip_op("Live", "Live", open_=True)},
        "/v2/health/ready": {"get": _oip_op("Ready (/healthz ok)", "Ready", open_=True)},
        base: model("Model metadata: a registered topology", "ModelMetadata"),
        versioned: model("Model metadata at one version", "ModelMetadata", True),
        base + "/ready": model("The topology is loaded", "ModelReady"),
        versioned + "/ready": model("The topology is loaded at this version", "ModelReady", True),
        base + "/infer": {"post": _infer(False, graph_id_pattern)},
        versioned + "/infer": {"post": _infer(True, graph_id_pattern)},
    }
