"""The OpenAPI description of the local HTTP endpoint, served at `/openapi.json` (SPEC §4).

Every operation may answer a refusal: a JSON `{"error", "message"}` with a 4xx status, or
503 (busy, retry) / 507 (the disk is full).
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
            "responses": {
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
                }
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
        },
    }
