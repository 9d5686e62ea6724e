"""What the agent says about a diffusion and its outbox: the HTTP answer (SPEC §4), the
result message body (SPEC §6), the diffuse command's reply data and the /outbox view."""

from __future__ import annotations

import base64
import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dgdm.kernels.engine import DiffusionResult
    from dgdm.sync.outbox import OutboxStats


def http_answer(result: DiffusionResult, seq: int | None) -> dict[str, Any]:
    """The `POST /diffuse` answer (SPEC §4)."""
    import numpy as np

    answer = {
        "job_id": result.job_id,
        "graph_id": result.graph_id,
        "backend": result.backend,
        "latency_ms": round(result.latency_ms, 4),
        "error_bound": result.error_bound,
        "node_ids": list(result.node_ids),
        "embedding": np.ascontiguousarray(result.embedding),
    }
    if seq is not None:
        answer["outbox_seq"] = seq
    return answer


def result_body(result: DiffusionResult) -> dict[str, Any]:
    """The result message body (SPEC §6): the embedding as little-endian float32 base64."""
    z = result.embedding.astype("<f4", copy=False)
    return {
        "job_id": result.job_id,
        "graph_id": result.graph_id,
        "method": result.method.to_json(),
        "backend": result.backend,
        "latency_ms": result.latency_ms,
        "error_bound": result.error_bound,
        "node_ids": list(result.node_ids),
        "embedding": {
            "dtype": "<f4",
            "shape": list(z.shape),
            "b64": base64.b64encode(z.tobytes()).decode(),
        },
    }


def command_answer(result: DiffusionResult, seq: int | None) -> dict[str, Any]:
    """The `diffuse` command's reply data: the embedding itself goes out as a result."""
    return {
        "job_id": result.job_id,
        "result_seq": seq,
        "backend": result.backend,
        "latency_ms": result.latency_ms,
        "error_bound": result.error_bound,
    }


def outbox_json(stats: OutboxStats | None) -> dict[str, Any]:
    """Depth, bytes and oldest age per kind, never payloads (SPEC §4 /outbox)."""
    if stats is None:
        return {"enabled": False}
    return {
        "enabled": True,
        "messages": stats.messages,
        "bytes": stats.bytes,
        "dropped": stats.dropped,
        "max_bytes": stats.max_bytes,
        "storage_full": stats.storage_full,
        "kinds": {name: dataclasses.asdict(k) for name, k in stats.kinds.items()},
    }
