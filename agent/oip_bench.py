"""`dgdm bench http --oip`: the Open Inference Protocol against the JSON routes, with wrk.

In one run, for one registered 100-node, F = 16 topology (`--nodes`, `--features`): an
aiohttp hello-world (reads the body, answers a small JSON: the ceiling), OIP binary infer,
OIP JSON infer, `POST /graphs/{id}/diffuse` and the one-off `POST /diffuse`, each with wrk
(`--connections`, the body from a file, a lua script for the headers; each figure the median
of `--repeat` runs); then the batching
figures: OIP binary with `kernels.batch_window_us` = 0 against the configured window at the
same connections, a B = 64 batch in one request, and a lone client's latency (one
connection) with and without the window; then OIP binary with `http.processes` =
`--processes` (SO_REUSEPORT) beside a hello-world of as many processes. Requests/s,
diffusions/s, p50, p99, ratio to the hello-world ceiling of as many processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from dgdm.agent import bench as http_bench

TARGETS = {"binary_diffusions_per_s": 10_000, "ratio": 0.5, "p99_ms": 10.0, "b64_per_s": 50_000}
BATCH = 64
LUA = """local f = assert(io.open(%s, "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
%s
"""


def main(args: argparse.Namespace) -> int:
    args.wrk = http_bench._wrk_path("wrk")
    with tempfile.TemporaryDirectory(prefix="dgdm-bench-oip-") as tmp:
        work = Path(tmp)
        bodies = write_bodies(work, args.nodes, args.features)
        ceilings = {1: _ceiling(args, work, bodies, 1)}
        rows = [("hello-world ceiling", 1, 1, ceilings[1])]
        rows += _agent_rows(args, work, bodies, args.window_us, full=True)
        rows += _agent_rows(args, work, bodies, 0, full=False)
        if args.processes > 1:
            ceilings[args.processes] = _ceiling(args, work, bodies, args.processes)
            name = f"hello-world ceiling, {args.processes} processes"
            rows.append((name, args.processes, 1, ceilings[args.processes]))
            rows += _agent_rows(
                args, work, bodies, args.window_us, full=False, processes=args.processes
            )
    results = [
        {"target": name, "processes": procs, "diffusions_per_s": round(m["rps"] * per, 1), **m,
         "ratio": round(m["rps"] / max(ceilings[procs]["rps"], 1e-9), 3)}
        for name, procs, per, m in rows
    ]  # fmt: skip
    if args.json:
        print(json.dumps({"connections": args.connections, "rows": results}, indent=2))
    else:
        _print(args, results)
    return 0


def write_bodies(work: Path, n: int, f: int) -> dict[str, tuple[Path, dict[str, str]]]:
    """Each target's body file and extra headers."""
    graph = json.loads(http_bench.bench_graph(n, f))
    x = np.array([node["features"] for node in graph["nodes"]], dtype=np.float32)
    batch = np.random.default_rng(9).random((BATCH, n, f), dtype=np.float32)
    json_type = {"Content-Type": "application/json"}
    bodies = {
        "register": (json.dumps(graph).encode(), json_type),
        "graph": (http_bench.bench_graph(n, f), json_type),
        "registered": (json.dumps({"x": x.tolist()}).encode(), json_type),
        "oip_json": (_oip_json(x), json_type),
        "oip_binary": _oip_binary(x),
        "oip_b64": _oip_binary(batch),
    }
    out = {}
    for name, (body, headers) in bodies.items():
        (work / f"{name}.body").write_bytes(body)
        out[name] = (work / f"{name}.body", headers)
    return out


def _oip_json(x: np.ndarray) -> bytes:
    tensor = {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


def _oip_binary(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    tensor: dict[str, Any] = {"name": "x", "datatype": "FP32", "shape": list(x.shape)}
    tensor["parameters"] = {"binary_data_size": x.nbytes}
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}})
    return header.encode() + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


# -- runs ---------------------------------------------------------------------------------


def _ceiling(args: argparse.Namespace, work: Path, bodies: Any, processes: int) -> dict[str, Any]:
    """wrk against `processes` hello-worlds on one port, once each is listening (a health
    check on the shared port would be answered by whichever listens first)."""
    from dgdm.sync.broker import free_port

    port = free_port()
    servers, ready = [], []
    for i in range(processes):
        ready.append(work / f"hello-{port}-{i}.ready")
        code = (
            "from dgdm.agent.oip_bench import serve_hello; "
            f"serve_hello({port}, {processes > 1}, {str(ready[-1])!r})"
        )
        servers.append(http_bench._spawn([sys.executable, "-c", code], work / f"hello-{i}.log"))
    try:
        deadline = time.monotonic() + 20.0
        while not all(path.exists() for path in ready):
            for server in servers:
                if server.poll() is not None:
                    raise RuntimeError(f"a hello-world exited with {server.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("the hello-world processes did not listen in 20 s")
            time.sleep(0.05)
        return _wrk(args, work, f"http://127.0.0.1:{port}/hello", bodies["oip_binary"])
    finally:
        for server in servers:
            http_bench._stop(server)


def _agent_rows(
    args: argparse.Namespace,
    work: Path,
    bodies: Any,
    window_us: int,
    *,
    full: bool,
    processes: int = 1,
) -> list[tuple[str, int, int, dict[str, Any]]]:
    from dgdm.sync.broker import free_port

    port = free_port()
    folder = work / f"agent-{window_us}-{processes}"
    config = work / f"agent-{window_us}-{processes}.toml"
    config.write_text(
        f'[device]\nid = "bench"\ndata_dir = "{folder}"\n[http]\nport = {port}\n'
        f"processes = {processes}\n"
        f'[kernels]\nbackend = "{args.backend}"\nbatch_window_us = {window_us}\n'
        '[log]\nlevel = "warning"\n',
        encoding="utf-8",
    )
    argv = [sys.executable, "-m", "dgdm.agent", "agent", "--config", str(config)]
    agent = http_bench._spawn(argv, work / f"agent-{window_us}-{processes}.log")
    base = f"http://127.0.0.1:{port}"
    infer = f"{base}/v2/models/bench/infer"
    tag = f"window {window_us} us" + (f", {processes} processes" if processes > 1 else "")
    p = processes
    try:
        http_bench._wait_http(f"{base}/healthz", agent, 30.0)
        _wait_serving(base, processes, 30.0)
        _register(f"{base}/graphs/bench", bodies["register"][0].read_bytes())
        rows = [(f"OIP binary, {tag}", p, 1, _wrk(args, work, infer, bodies["oip_binary"]))]
        if full:
            rows.append((f"OIP JSON, {tag}", p, 1, _wrk(args, work, infer, bodies["oip_json"])))
            graphs = f"{base}/graphs/bench/diffuse"
            registered = _wrk(args, work, graphs, bodies["registered"])
            rows.append(("JSON /graphs/{id}/diffuse", p, 1, registered))
            one_off = _wrk(args, work, f"{base}/diffuse", bodies["graph"])
            rows.append(("JSON POST /diffuse", p, 1, one_off))
        batch = _wrk(args, work, infer, bodies["oip_b64"])
        rows.append((f"OIP binary B={BATCH}, {tag}", p, BATCH, batch))
        lone = _wrk(args, work, infer, bodies["oip_binary"], connections=1)
        rows.append((f"OIP binary lone client, {tag}", p, 1, lone))
        return rows
    finally:
        http_bench._stop(agent)


def _wait_serving(base: str, processes: int, timeout_s: float) -> None:
    """Until the agent's /status counts all its serving processes listening."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{base}/status", timeout=5) as r:  # noqa: S310 - loopback
            if json.loads(r.read())["http"]["serving"] >= processes:
                return
        time.sleep(0.1)
    raise RuntimeError(f"the agent's serving processes did not listen in {timeout_s} s")


def _register(url: str, body: bytes) -> None:
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(url, data=body, method="PUT", headers=headers)  # noqa: S310
    with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 - loopback http
        r.read()


def _wrk(
    args: argparse.Namespace,
    work: Path,
    url: str,
    body: tuple[Path, dict[str, str]],
    connections: int | None = None,
) -> dict[str, Any]:
    path, headers = body
    script = work / f"{path.stem}.lua"
    lines = "\n".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items())
    script.write_text(LUA % (json.dumps(str(path)), lines), encoding="utf-8")
    conns = connections or args.connections
    argv = [args.wrk, "-t1", f"-c{conns}", "--latency", "-s", str(script), url]
    if args.warmup > 0:
        subprocess.run([*argv[:3], f"-d{max(1, round(args.warmup))}s", *argv[3:]],
                       capture_output=True, check=True)  # fmt: skip
    runs = []
    for _ in range(max(1, args.repeat)):
        out = subprocess.run([*argv[:3], f"-d{max(1, round(args.duration))}s", *argv[3:]],
                             capture_output=True, text=True, check=True)  # fmt: skip
        runs.append(http_bench.parse_wrk(out.stdout))
        time.sleep(0.2)
    return _medians(runs)


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the runs (each run opens its own connections: with
    several serving processes, how the kernel spreads them differs from run to run)."""
    out = {
        k: statistics.median(r[k] for r in runs)
        for k in ("rps", "p50_ms", "p99_ms")
        if all(r[k] is not None for r in runs)
    }
    return {**runs[0], **out, "errors": sum(r["errors"] for r in runs), "runs": len(runs)}


def serve_hello(port: int, reuse_port: bool = False, ready: str | None = None) -> None:
    """The ceiling: aiohttp reads the body and answers a small JSON, nothing else; `ready`
    is a file made once it listens."""
    import asyncio

    from aiohttp import web

    async def hello(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"hello": "world"})

    async def serve() -> None:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/hello", hello)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, reuse_port=reuse_port or None).start()
        if ready is not None:
            await asyncio.to_thread(Path(ready).touch)
        await asyncio.Event().wait()  # until the bench stops it

    asyncio.run(serve())


def _print(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    print(f"dgdm bench http --oip: wrk 1 thread, {args.connections} connections "
          f"(lone client: 1), {args.nodes} nodes x {args.features} features")  # fmt: skip
    width = max(len(r["target"]) for r in rows) + 2
    print(f"{'':{width}}{'req/s':>9}{'diff/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'ratio':>7}{'err':>5}")
    for r in rows:
        figures = f"{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}{r['ratio']:>7.2f}{r['errors']:>5}"
        print(f"{r['target']:{width}}{r['rps']:>9.0f}{r['diffusions_per_s']:>10.0f}{figures}")
    print("ratio: to the hello-world ceiling of as many processes")
    print(f"targets: {TARGETS}")
