"""The OpenAPI description of the local HTTP endpoint, served at `/openapi.json` (SPEC §4).

It describes exactly what the agent answers, and is built per running config: the bearer
security requirement only where a token is required (beyond loopback, or with `http.token`
set), none at all on loopback without a token. Every §4 refusal is a JSON
`{"error": "<code>", "message": "<sentence>"}` (agent/http.py); under `/v2` (the Open
Inference Protocol, SPEC §4.1, agent/oip.py) the protocol's `{"error": "<sentence>"}`.
tests/agent/test_openapi.py runs schemathesis over the whole document against live agents.
"""

from __future__ import annotations

from typing import Any

_JSON = "application/json"
# Prometheus' text exposition format (agent/metrics.py CONTENT_TYPE, without its charset)
METRICS_MEDIA_TYPE = "text/plain; version=0.0.4"
# The refusals every §4 operation may answer, whatever its handler does.
_ALWAYS = {
    "421": "The Host header names no loopback address, http.bind or http.allowed_hosts",
    "503": "busy: too many request bodies in flight or the queue is full (Retry-After)",
}
_BODY = {
    "400": "bad_json, empty_body, bad_query (queue, deadline_s) or no_outbox (queue=1 "
    "without an outbox)",
    "413": "too_large: the body is over http.max_body_bytes, the graph over a kernels "
    "limit, or every backend's working memory over kernels.max_diffusion_bytes",
    "415": "unsupported_media_type: the body must be application/json",
    "422": "invalid_graph / invalid: the field named in message is wrong",
}
_DIFFUSE = {
    "503": "busy, shutting_down, backend_unavailable or store_unavailable (Retry-After)",
    "504": "deadline_exceeded: the diffusion outlived its deadline (deadline_s)",
    "507": "storage_full / outbox_full: the disk or the outbox is full, nothing was stored",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    """An answer's schema: exactly these properties (those not required may be absent)."""
    return {
        "type": "object",
        "required": required,
        "properties": properties,
        "additionalProperties": False,
    }


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _refusals(statuses: dict[str, str], token: bool) -> dict[str, Any]:
    answers = {**_ALWAYS, **statuses}
    if token:
        answers["401"] = "unauthorized: a valid bearer token is required (WWW-Authenticate)"
    return {code: _json(_ref("Error"), text) for code, text in sorted(answers.items())}


def _param(name: str, where: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    param = {"name": name, "in": where, "required": where == "path", "schema": schema}
    if description:
        param["description"] = description
    return param


def _case_insensitive(words: list[str]) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in "|".join(words))


# ?queue=: the flags agent/http.py accepts, in any case (empty means 1).
_QUEUE = _param(
    "queue",
    "query",
    {
        "type": "string",
        "pattern": f"^({_case_insensitive(['1', 'true', 'yes', '0', 'false', 'no'])})?$",
    },
    "1: commit the result to the outbox before answering (needs an outbox)",
)
_DEADLINE = _param(
    "deadline_s",
    "query",
    {"type": "number", "minimum": 0, "exclusiveMinimum": True},
    "This request's deadline in seconds, at most kernels.deadline_s",
)


def _operation(
    summary: str,
    answer: dict[str, Any],
    refusals: dict[str, str],
    token: bool,
    *,
    body: dict[str, Any] | None = None,
    params: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": answer, **_refusals(refusals, token)},
    }
    if params:
        op["parameters"] = params
    if body is not None:
        media: dict[str, Any] = {"schema": body}
        name = body.get("$ref", "").rsplit("/", 1)[-1]
        if name in EXAMPLES:
            media["example"] = EXAMPLES[name]
        op["requestBody"] = {"required": True, "content": {_JSON: media}}
        # sync/http_guard.py cuts off a body slower than http.body_min_bytes_per_s
        op["responses"]["408"] = {"description": "The body came too slowly; no content"}
    return op


def _operation_id(method: str, path: str) -> str:
    """`put /graphs/{graph_id}` -> `put_graphs_graph_id`, `get /` -> `get_index`."""
    words = [w.strip("{}").replace(".", "_") for w in path.split("/") if w]
    return "_".join([method, *words]) if words else f"{method}_index"


def _links() -> dict[str, Any]:
    """What a registered topology's answer leads to: its id names the graph and the OIP
    model, its key is the model's version (the stateful phase follows these)."""
    graph = {"graph_id": "$response.body#/graph_id"}
    model = {"name": "$response.body#/graph_id"}
    versioned = {**model, "version": "$response.body#/key"}
    targets = [
        ("patch", "/graphs/{graph_id}", graph),
        ("delete", "/graphs/{graph_id}", graph),
        ("post", "/graphs/{graph_id}/diffuse", graph),
        ("get", "/v2/models/{name}", model),
        ("get", "/v2/models/{name}/ready", model),
        ("post", "/v2/models/{name}/infer", model),
        ("get", "/v2/models/{name}/versions/{version}", versioned),
        ("get", "/v2/models/{name}/versions/{version}/ready", versioned),
        ("post", "/v2/models/{name}/versions/{version}/infer", versioned),
    ]
    links = {}
    for method, path, parameters in targets:
        target = _operation_id(method, path)
        links[target] = {"operationId": target, "parameters": parameters}
    return links


_TOPOLOGY_LINKS = _links()


def openapi_document(
    version: str, graph_id_pattern: str, *, token_required: bool = True
) -> dict[str, Any]:
    """The document for an agent that requires a bearer token or (loopback without
    `http.token`) none."""
    gid = _param("graph_id", "path", {"type": "string", "pattern": f"^{graph_id_pattern}$"})
    gid["example"] = "example"
    unknown = {"404": "unknown_graph: no topology is registered under this id"}
    bad_id = {"422": "invalid_graph: the graph id does not match the pattern"}
    t = token_required
    graph_ops = {
        "put": _operation(
            "Register a topology and method (graph JSON; graph_id, if given, the path's)",
            _json(_ref("Topology")),
            {**_BODY, **_DIFFUSE},
            t,
            body=_ref("Graph"),
            params=[gid],
        ),
        "patch": _operation(
            "Add, remove or reweight edges: a new operator",
            _json(_ref("Topology")),
            {**_BODY, **_DIFFUSE, **unknown},
            t,
            body=_ref("EdgeChanges"),
            params=[gid],
        ),
        "delete": _operation(
            "Forget a topology",
            _json(_object(["graph_id", "deleted"], {"graph_id": _STRING, "deleted": _TRUE})),
            {**unknown, **bad_id, **_DIFFUSE},
            t,
            params=[gid],
        ),
    }
    health = _json(_ref("Health"))
    paths: dict[str, Any] = {
        "/": {
            "get": {
                "summary": "The status page (HTML; it polls /status)",
                "responses": {
                    "200": {"description": "OK", "content": {"text/html": {"schema": _STRING}}},
                    **_refusals({}, t),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness and readiness: 503 with the failing checks",
                "security": [],
                "responses": {
                    "200": health,
                    **_refusals({}, False),
                    "503": _json(
                        {"oneOf": [_ref("Health"), _ref("Error")]},
                        "A check fails (Health), or busy (Error)",
                    ),
                },
            }
        },
        "/status": {
            "get": _operation(
                "Device, backend, TPU, broker and outbox state", _json(_ref("Status")), {}, t
            )
        },
        "/metrics": {
            "get": _operation(
                "Prometheus metrics (text exposition format 0.0.4)",
                {"description": "OK", "content": {METRICS_MEDIA_TYPE: {"schema": _STRING}}},
                {},
                t,
            )
        },
        "/tpu": {"get": _operation("Edge TPU state and backends", _json(_ref("Tpu")), {}, t)},
        "/outbox": {
            "get": _operation(
                "Outbox depth, bytes and oldest age per kind", _json(_ref("Outbox")), {}, t
            )
        },
        "/openapi.json": {"get": _operation("This document", _json({"type": "object"}), {}, t)},
        "/diffuse": {
            "post": _operation(
                "Diffuse a graph (SPEC §3)",
                _json(_ref("Diffusion")),
                {**_BODY, **_DIFFUSE},
                t,
                body=_ref("Graph"),
                params=[_QUEUE, _DEADLINE],
            )
        },
        "/graphs": {
            "get": _operation(
                "Registered topologies",
                _json(
                    _object(["graphs"], {"graphs": {"type": "array", "items": _ref("Topology")}})
                ),
                {},
                t,
            )
        },
        "/graphs/{graph_id}": graph_ops,
        "/graphs/{graph_id}/diffuse": {
            "post": _operation(
                "Diffuse features {x} on a registered topology",
                _json(_ref("Diffusion")),
                {**_BODY, **_DIFFUSE, **unknown},
                t,
                body=_ref("Features"),
                params=[gid, _QUEUE, _DEADLINE],
            )
        },
        **_oip_paths(graph_id_pattern),
    }
    for path, ops in paths.items():
        for method, op in ops.items():
            op["operationId"] = _operation_id(method, path)
            if path.startswith("/v2"):
                op["responses"].update(_oip_refusals(path, t))
    for method in ("put", "patch"):
        graph_ops[method]["responses"]["200"]["links"] = _TOPOLOGY_LINKS
    components: dict[str, Any] = {"schemas": {**SCHEMAS, **OIP_SCHEMAS}}
    doc: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": "dgdm-edge agent", "version": version},
        "components": components,
        "paths": paths,
    }
    if token_required:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    else:  # nothing to say: no operation asks for credentials
        for ops in paths.values():
            for op in ops.values():
                op.pop("security", None)
    return doc


# -- the Open Inference Protocol v2 (SPEC §4.1) --------------------------------------------

_HEADER_LENGTH = "Inference-Header-Content-Length"


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


def _oip_refusals(path: str, token: bool) -> dict[str, Any]:
    """Every refusal a /v2 operation may answer, as the protocol's `{"error": sentence}`."""
    answers = {**_ALWAYS}
    if token and path not in ("/v2/health/live", "/v2/health/ready"):
        answers["401"] = "A valid bearer token is required (WWW-Authenticate)"
    if path == "/v2/health/ready":
        answers["503"] = "Not ready: the sentence names the failing checks of /healthz"
    if "{name}" in path:
        answers["404"] = "No such model (registered topology), or not at this version"
    refusals = {code: _json(_ref("OipError"), text) for code, text in sorted(answers.items())}
    if path.endswith("/infer"):
        infer = {
            "400": "A malformed request: the sentence names the field (shape, data, F, N)",
            "413": "The body is over http.max_body_bytes or the diffusion over a kernels limit",
            "503": "busy, shutting down, no backend, or the results could not be queued",
            "504": "The diffusion outlived kernels.deadline_s",
        }
        refusals.update({code: _json(_ref("OipError"), text) for code, text in infer.items()})
        refusals["408"] = {"description": "The body came too slowly; no content"}
    return dict(sorted(refusals.items()))


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


# -- the §4 routes' bodies and answers ----------------------------------------------------


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


def _array(items: dict[str, Any], **limits: int) -> dict[str, Any]:
    return {"type": "array", "items": items, **limits}


_BOOL = {"type": "boolean"}
_INT = {"type": "integer"}
_COUNT = {"type": "integer", "minimum": 0}
_NUMBER = {"type": "number"}
_POSITIVE = {"type": "number", "minimum": 0, "exclusiveMinimum": True}
_NODE_ID = {"anyOf": [_STRING, _INT]}  # not a boolean
_KINDS = {"type": "string", "enum": ["ppr", "heat", "poly"]}
_NORMALIZATIONS = {"type": "string", "enum": ["sym", "col", "row"]}
_ROWS = _array(_array(_NUMBER))
_GRAPH_ID = {"type": "string", "minLength": 1, "maxLength": 128}


def _graph_forms() -> dict[str, Any]:
    """SPEC §3: the node form, or the compact PyG-style one; unknown fields are refused
    (kernels/graph.py, kernels/method.py). What JSON Schema cannot say is answered 422:
    unique node ids, edges naming known nodes, rows of one width, kernels.* limits."""
    method = _nullable(
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "kind": _KINDS,
                "alpha": {**_NUMBER, "minimum": 1e-6, "maximum": 1},
                "t": {**_NUMBER, "minimum": 0, "maximum": 1000},
                "coefficients": _nullable(_array(_NUMBER, minItems=1, maxItems=1000)),
                "normalization": _NORMALIZATIONS,
                "self_loops": _BOOL,
                "k": _nullable({**_COUNT, "maximum": 1000}),
            },
        }
    )
    common = {"graph_id": _nullable(_GRAPH_ID), "directed": _BOOL, "method": method}
    node = {
        "type": "object",
        "required": ["id"],
        "additionalProperties": False,
        "properties": {"id": _NODE_ID, "features": _nullable(_array(_NUMBER))},
    }
    edge = {
        "type": "object",
        "required": ["source", "target"],
        "additionalProperties": False,
        "properties": {"source": _NODE_ID, "target": _NODE_ID, "weight": _POSITIVE},
    }
    nodes_form = {
        "type": "object",
        "required": ["nodes"],
        "additionalProperties": False,
        "properties": {**common, "nodes": _array(node), "edges": _array(edge)},
    }
    compact_form = {
        "type": "object",
        "additionalProperties": False,
        "anyOf": [{"required": ["num_nodes"]}, {"required": ["x"]}],
        "properties": {
            **common,
            "num_nodes": _COUNT,
            "edge_index": _array(_array(_COUNT), minItems=2, maxItems=2),
            "edge_weight": _nullable(_array(_POSITIVE)),
            "x": _nullable(_ROWS),
        },
    }
    return {"anyOf": [nodes_form, compact_form]}


_METHOD = _object(
    ["kind", "normalization", "self_loops"],
    {
        "kind": _KINDS,
        "normalization": _NORMALIZATIONS,
        "self_loops": _BOOL,
        "alpha": _NUMBER,  # ppr
        "t": _NUMBER,  # heat
        "k": _nullable(_COUNT),  # ppr and heat: null is the exact form
        "coefficients": _array(_NUMBER),  # poly
    },
)
_BACKEND = _object(
    [
        "name",
        "available",
        "reason",
        "failures",
        "fallbacks",
        "healthy",
        "failing",
        "last_error",
        "excluded",
    ],
    {
        "name": _STRING,
        "available": _BOOL,
        "reason": _STRING,
        "failures": _COUNT,
        "fallbacks": _COUNT,
        "healthy": _BOOL,
        "failing": _BOOL,
        "last_error": _STRING,
        "excluded": _BOOL,
    },
)
# agent/status.py tpu_json: the reading (only `present` without a TPU watcher) and its limits
_TPU = {
    "present": _BOOL,
    "devices": _array(_STRING),
    "reason": _STRING,
    "temp_c": _nullable(_NUMBER),
    "runtime": _nullable(_STRING),
    "temperature_limit_c": _NUMBER,
    "thermal_protection": _BOOL,
}
_TPU_REQUIRED = ["present", "temperature_limit_c", "thermal_protection"]
_KIND_STATS = _object(
    ["messages", "bytes", "oldest_age_ms", "dropped"],
    {
        "messages": _COUNT,
        "bytes": _COUNT,
        "oldest_age_ms": _nullable(_COUNT),
        "dropped": _COUNT,
    },
)
_OUTBOX = {
    "oneOf": [
        _object(["enabled"], {"enabled": {"type": "boolean", "enum": [False]}}),
        _object(
            ["enabled", "messages", "bytes", "dropped", "max_bytes", "storage_full", "kinds"],
            {
                "enabled": _TRUE,
                "messages": _COUNT,
                "bytes": _COUNT,
                "dropped": _COUNT,
                "max_bytes": _COUNT,
                "storage_full": _BOOL,
                "kinds": {"type": "object", "additionalProperties": _KIND_STATS},
            },
        ),
    ]
}
_STATUS_KEYS = {
    "device_id": _STRING,
    "agent_version": _STRING,
    "uptime_s": _NUMBER,
    "started_ms": _INT,
    "active_backend": _STRING,
    "backends": _array(_ref("Backend")),
    "tpu": _object(_TPU_REQUIRED, _TPU),
    "broker": _object(
        ["configured", "connected"],
        {
            "configured": _BOOL,
            "connected": _BOOL,
            "last_sync_ms": _nullable(_INT),
            "wire": _STRING,
            # coordinator minus device wall clock (SPEC §6.1); null before two receipts agree
            "clock_skew_ms": _nullable(_INT),
        },
    ),
    "outbox": _ref("Outbox"),
    "queue": _object(["in_flight", "capacity"], {"in_flight": _COUNT, "capacity": _COUNT}),
    "http": _object(["processes", "serving"], {"processes": _COUNT, "serving": _COUNT}),
    "diffusions": _COUNT,
    "latency_ms": _object(
        ["p50", "p99", "n"], {"p50": _nullable(_NUMBER), "p99": _nullable(_NUMBER), "n": _COUNT}
    ),
    "recent_latency_ms": _array(_NUMBER),
    "loop_lag_ms": _NUMBER,
    # agent/alerts.py: each alert's body with its time; the config without secrets
    "alerts": _array({"type": "object", "required": ["ts_ms"]}),
    "config": {"type": "object"},
}
# Requests that succeed, one per body (the examples phase sends them in document order:
# register the topology "example", diffuse on it, change it, forget it).
EXAMPLES: dict[str, Any] = {
    "Graph": {
        "directed": False,
        "nodes": [{"id": "a", "features": [0.1, 0.2]}, {"id": "b", "features": [0.0, 1.0]}],
        "edges": [{"source": "a", "target": "b", "weight": 0.8}],
        "method": {"kind": "ppr", "alpha": 0.15, "normalization": "sym", "self_loops": True},
    },
    "Features": {"x": [[1.0], [0.5]]},
    "EdgeChanges": {"reweight": [{"source": "a", "target": "b", "weight": 2.0}]},
}
SCHEMAS: dict[str, Any] = {
    "Error": _object(["error", "message"], {"error": _STRING, "message": _STRING}),
    "Graph": _graph_forms(),
    "Features": _object(["x"], {"x": _array(_array(_NUMBER, minItems=1))}),
    # Each list's edges are checked by the engine (known nodes, weights); at least one edge.
    "EdgeChanges": {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "properties": {name: _array({}) for name in ("add", "remove", "reweight")},
    },
    "Topology": _object(
        ["graph_id", "key", "nodes", "edges", "directed", "method", "features"],
        {
            "graph_id": _STRING,
            "key": _STRING,
            "nodes": _COUNT,
            "edges": _COUNT,
            "directed": _BOOL,
            "method": _METHOD,
            "features": _nullable(_COUNT),  # F when registered with features
        },
    ),
    "Diffusion": _object(
        ["job_id", "graph_id", "backend", "latency_ms", "error_bound", "node_ids", "embedding"],
        {
            "job_id": _STRING,
            "graph_id": _nullable(_STRING),
            "backend": _STRING,
            "latency_ms": _NUMBER,
            "error_bound": _NUMBER,
            "node_ids": _array(_NODE_ID),
            "embedding": _ROWS,
            "outbox_seq": _INT,  # with ?queue=1
        },
    ),
    "Health": _object(
        ["status", "checks", "version"],
        {
            "status": {"type": "string", "enum": ["ok", "failing"]},
            "checks": _object(
                ["loop", "store", "backend", "workers"],
                dict.fromkeys(("loop", "store", "backend", "workers"), _BOOL),
            ),
            "version": _STRING,
        },
    ),
    "Backend": _BACKEND,
    "Tpu": _object([*_TPU_REQUIRED, "backends"], {**_TPU, "backends": _array(_ref("Backend"))}),
    "Outbox": _OUTBOX,
    "Status": _object(sorted(_STATUS_KEYS), _STATUS_KEYS),
}
