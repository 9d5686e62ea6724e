"""A backend failing at run time is visible: the real path, on the real TFLite runtime.

An agent builds int8 models for F = 4 and F = 5 (cached in `cache_dir`), stops; a second
agent on the same data_dir finds both files corrupted (one truncated, one bit-flipped)
while it runs. Each diffusion falls back to numpy without a restart and is counted in
`dgdm_backend_failures_total{backend="tflite"}`; `backend_failed` is announced once for
both failures; after the re-probe the model is rebuilt, tflite answers again,
`backend_recovered` is announced and `dgdm_backend_active` follows the backend that answers.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

Agent = Any  # conftest.AgentProcess


def with_features(graph: dict[str, Any], f: int) -> bytes:
    nodes = [
        {"id": n["id"], "features": [1.0 + 0.1 * ((i + j) % 7) for j in range(f)]}
        for i, n in enumerate(graph["nodes"])
    ]
    return json.dumps({**graph, "nodes": nodes}).encode()


def diffuse(agent: Agent, body: bytes) -> str:
    answer = agent.request("POST", "/diffuse", body)
    assert answer.status == 200, answer.body
    return str(answer.json()["backend"])


def metric(agent: Agent, name: str, **labels: str) -> float | None:
    text = agent.get("/metrics").body.decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)"
    found = re.search("^" + pattern + "$", text, re.MULTILINE)
    return None if found is None else float(found.group(1))


def alerts(agent: Agent) -> dict[str, float]:
    out = {}
    for code in ("backend_failed", "backend_recovered"):
        value = metric(agent, "dgdm_alerts_total", code=code)
        if value:
            out[code] = value
    return out


def eventually(check: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out; last value {value!r}"
        time.sleep(0.1)


def test_corrupted_model_falls_back_counts_alerts_once_and_recovers(
    start_agent: Callable[..., Agent], karate: dict[str, Any]
) -> None:
    f4, f5 = with_features(karate, 4), with_features(karate, 5)
    sections = {"kernels": {"backend": "tflite"}}
    first = start_agent(sections)
    assert diffuse(first, f4) == "tflite"
    assert diffuse(first, f5) == "tflite"
    data_dir = first.data_dir
    first.stop()
    models = {
        p.name[-len("-f4.tflite") :]: p for p in (data_dir / "cache" / "tflite").glob("*.tflite")
    }
    assert set(models) == {"-f4.tflite", "-f5.tflite"}, models

    second = start_agent({**sections, "device": {"data_dir": str(data_dir)}})
    assert metric(second, "dgdm_backend_failures_total", backend="tflite") == 0.0
    truncated = models["-f4.tflite"]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    flipped = models["-f5.tflite"]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))

    assert diffuse(second, f4) == "numpy"  # fell back, no restart
    assert metric(second, "dgdm_backend_failures_total", backend="tflite") == 1.0
    assert metric(second, "dgdm_backend_active", backend="numpy") == 1.0
    assert metric(second, "dgdm_backend_active", backend="tflite") == 0.0
    assert eventually(lambda: alerts(second)) == {"backend_failed": 1.0}
    status = second.get("/status").json()
    failed = [a for a in status["alerts"] if a["code"] == "backend_failed"]
    assert failed[0]["details"]["backends"] == ["tflite"], failed
    assert "sha256" in failed[0]["details"]["reasons"]["tflite"]

    time.sleep(1.3)  # past the first re-probe backoff (1 s): tflite is tried again
    assert diffuse(second, f5) == "numpy"
    assert metric(second, "dgdm_backend_failures_total", backend="tflite") == 2.0
    time.sleep(1.5)  # more than one monitor round: still announced once
    assert alerts(second) == {"backend_failed": 1.0}

    time.sleep(1.0)  # past the second backoff (2 s): the removed model is rebuilt
    assert diffuse(second, f4) == "tflite"
    assert eventually(lambda: "backend_recovered" in alerts(second))
    assert alerts(second) == {"backend_failed": 1.0, "backend_recovered": 1.0}
    assert metric(second, "dgdm_backend_active", backend="tflite") == 1.0
    assert metric(second, "dgdm_backend_failures_total", backend="tflite") == 2.0
    assert second.proc.poll() is None
