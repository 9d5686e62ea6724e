"""`dgdm bench http`: the agent's POST /diffuse against a parse-only aiohttp ceiling.

Three processes: the server under test, and a load generator with `--connections`
concurrent keep-alive connections: wrk (Debian's `wrk`, one thread) when it is on PATH, else
an aiohttp client process (`--client` chooses). For the same 100-node, 16-feature graph JSON
it measures (a) an aiohttp endpoint that only decodes the body with the agent's generic JSON
decoder (the ceiling), and (b) the real agent (`python -m dgdm.agent agent`) answering
POST /diffuse; then requests/s, p50, p99 and the ratio b/a, the agent's RSS idle and under
load, and the time from process start to /healthz 200. Each figure is the median of
`--repeat` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

TARGETS = {"ratio": 0.60, "p99_ms": 10.0, "rss_idle_mb": 80.0, "ready_s": 1.5}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load per run")
    parser.add_argument("--warmup", type=float, default=1.5, help="seconds before measuring")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--client",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator: wrk when on PATH (auto), or the aiohttp client process",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per target (medians)")
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--backend", default="auto", help="the agent's kernels.backend")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--oip",
        action="store_true",
        help="the Open Inference Protocol against the JSON routes, and batching (needs wrk)",
    )
    parser.add_argument(
        "--window-us", type=int, default=200, help="with --oip: kernels.batch_window_us"
    )
    parser.add_argument(
        "--processes", type=int, default=2, help="with --oip: http.processes of the last rows"
    )


def main(args: argparse.Namespace) -> int:
    if args.oip:
        from dgdm.agent import oip_bench

        return oip_bench.main(args)
    body = bench_graph(args.nodes, args.features)
    args.wrk = _wrk_path(args.client)
    generator = f"{_wrk_version(args.wrk)}, 1 thread" if args.wrk else "aiohttp client process"
    with tempfile.TemporaryDirectory(prefix="dgdm-bench-http-") as tmp:
        work = Path(tmp)
        (work / "graph.json").write_bytes(body)
        results: dict[str, Any] = {
            "load_generator": f"{generator}, {args.connections} connections",
            "body_bytes": len(body),
            "json_library": _json_library(),
            "ceiling": _median_runs(args, work, _run_ceiling),
            "agent": _median_runs(args, work, _run_agent),
        }
    ceiling, agent = results["ceiling"]["rps"], results["agent"]["rps"]
    results["ratio"] = round(agent / max(ceiling, 1e-9), 3)
    results["targets"] = TARGETS
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print_table(results)
    return 0


def bench_graph(n: int, f: int, seed: int = 5) -> bytes:
    """A ring plus random chords (about 4 edges per node), features in [0, 1)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    edges = [{"source": i, "target": (i + 1) % n} for i in range(n)]
    chords = rng.integers(0, n, (3 * n, 2))
    edges += [{"source": int(a), "target": int(b)} for a, b in chords if a != b]
    x = rng.random((n, f)).round(4)
    nodes = [{"id": i, "features": x[i].tolist()} for i in range(n)]
    return json.dumps({"nodes": nodes, "edges": edges}).encode()


def _json_library() -> str:
    from dgdm.agent import jsonio

    return jsonio.library()


# -- runs ---------------------------------------------------------------------------------


def _median_runs(args: argparse.Namespace, work: Path, run: Any) -> dict[str, Any]:
    runs = [run(args, work) for _ in range(args.repeat)]
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    out: dict[str, Any] = {k: round(statistics.median(r[k] for r in runs), 3) for k in keys}
    out["runs"] = runs
    return out


def _run_ceiling(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from dgdm.sync.broker import free_port

    port = free_port()
    code = f"from dgdm.agent.bench import serve_parse_only; serve_parse_only({port})"
    server = _spawn([sys.executable, "-c", code], work / "ceiling.log")
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", server, 20.0)
        return _load(args, work, f"http://127.0.0.1:{port}/parse", server.pid)
    finally:
        _stop(server)


def _run_agent(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import psutil

    from dgdm.sync.broker import free_port

    port = free_port()
    config = work / "agent.toml"
    config.write_text(
        f'[device]\nid = "bench"\ndata_dir = "{work / "agent"}"\n'
        f'[http]\nport = {port}\n[kernels]\nbackend = "{args.backend}"\n'
        '[log]\nlevel = "warning"\n',
        encoding="utf-8",
    )
    started = time.monotonic()
    agent = _spawn(
        [sys.executable, "-m", "dgdm.agent", "agent", "--config", str(config)], work / "agent.log"
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", agent, 30.0)
        ready_s = time.monotonic() - started
        time.sleep(1.0)
        rss_idle = psutil.Process(agent.pid).memory_info().rss / 2**20
        result = _load(args, work, f"http://127.0.0.1:{port}/diffuse", agent.pid)
        return {"ready_s": round(ready_s, 3), "rss_idle_mb": round(rss_idle, 1), **result}
    finally:
        _stop(agent)


def _load(args: argparse.Namespace, work: Path, url: str, server_pid: int) -> dict[str, Any]:
    """Run the load generator process while sampling the server's RSS."""
    if args.wrk:
        if args.warmup > 0:
            _sample_rss(_wrk(args, work, url, args.warmup), server_pid)
        gen = _wrk(args, work, url, args.duration)
    else:
        code = (
            "import sys, json; from dgdm.agent.bench import generate_load; "
            f"print(json.dumps(generate_load({url!r}, {str(work / 'graph.json')!r}, "
            f"{args.connections}, {args.warmup}, {args.duration})))"
        )
        gen = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    peak = _sample_rss(gen, server_pid)
    out, _ = gen.communicate()
    if gen.returncode != 0:
        raise RuntimeError(f"load generator failed with {gen.returncode}")
    measured = parse_wrk(out) if args.wrk else json.loads(out)
    return {**measured, "rss_load_mb": round(peak, 1)}


def _sample_rss(gen: subprocess.Popen[str], server_pid: int) -> float:
    """The server's peak RSS in MB while `gen` runs (waits for it to exit)."""
    import psutil

    server = psutil.Process(server_pid)
    peak = 0.0
    while gen.poll() is None:
        peak = max(peak, server.memory_info().rss / 2**20)
        time.sleep(0.2)
    return peak


# -- wrk ----------------------------------------------------------------------------------

WRK_SCRIPT = """local f = assert(io.open(%s, "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "application/json"
"""


def _wrk_path(client: str) -> str | None:
    if client == "python":
        return None
    path = shutil.which("wrk")
    if path is None and client == "wrk":
        raise SystemExit("dgdm bench http: --client wrk, but wrk is not on PATH (apt install wrk)")
    return path


def _wrk_version(path: str) -> str:
    out = subprocess.run([path, "-v"], capture_output=True, text=True, check=False)
    return (out.stdout + out.stderr).split(" [", 1)[0].strip() or "wrk"


def _wrk(args: argparse.Namespace, work: Path, url: str, seconds: float) -> subprocess.Popen[str]:
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT % json.dumps(str(work / "graph.json")), encoding="utf-8")
    argv = [args.wrk, "-t1", f"-c{args.connections}", f"-d{max(1, round(seconds))}s"]
    argv += ["--latency", "-s", str(script), url]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


_WRK_SOCKET_ERRORS = r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def parse_wrk(text: str) -> dict[str, Any]:
    """requests, errors, rps, p50_ms and p99_ms from `wrk --latency` output. Errors are
    non-2xx/3xx answers plus socket errors (connect, read, write, timeout)."""
    requests = re.search(r"^\s*(\d+) requests in ([\d.]+)(\w+),", text, re.M)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if requests is None or rps is None:
        raise RuntimeError(f"unexpected wrk output: {text[:300]!r}")
    latency = {
        pct: float(value) * _WRK_UNITS[unit]
        for pct, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m|h)$", text, re.M)
    }
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket = re.search(_WRK_SOCKET_ERRORS, text)
    errors = int(non_2xx.group(1)) if non_2xx else 0
    errors += sum(map(int, socket.groups())) if socket else 0
    return {
        "requests": int(requests.group(1)),
        "errors": errors,
        "rps": float(rps.group(1)),
        "p50_ms": round(latency["50"], 3) if "50" in latency else None,
        "p99_ms": round(latency["99"], 3) if "99" in latency else None,
    }


# -- processes ----------------------------------------------------------------------------


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310 - loopback http
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"{url} not ready within {timeout_s} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


# -- the two other processes ----------------------------------------------------------------


def serve_parse_only(port: int) -> None:
    """The ceiling: aiohttp reads the body and decodes it with the agent's JSON decoder."""
    from aiohttp import web

    from dgdm.agent.jsonio import loads

    async def parse(request: web.Request) -> web.Response:
        loads(await request.read())
        return web.json_response({"ok": True})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/parse", parse)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def generate_load(
    url: str, body_path: str, connections: int, warmup_s: float, duration_s: float
) -> dict[str, Any]:
    return asyncio.run(_generate(url, Path(body_path).read_bytes(), connections, warmup_s,
                                 duration_s))  # fmt: skip


async def _generate(
    url: str, body: bytes, connections: int, warmup_s: float, duration_s: float
) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s
    headers = {"Content-Type": "application/json"}

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while (now := time.perf_counter()) < stop_at:
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                ok = r.status == 200
            if now >= measure_from:
                latencies.append(time.perf_counter() - now)
                errors += not ok

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(connections)))
    latencies.sort()
    count = len(latencies)
    return {
        "requests": count,
        "errors": errors,
        "rps": round(count / duration_s, 1),
        "p50_ms": round(latencies[count // 2] * 1000, 3) if count else None,
        "p99_ms": round(latencies[min(count - 1, int(count * 0.99))] * 1000, 3) if count else None,
    }


def _print_table(r: dict[str, Any]) -> None:
    c, a = r["ceiling"], r["agent"]
    print(f"dgdm bench http: {r['load_generator']}, body {r['body_bytes']} bytes, "
          f"decoder {r['json_library']}, medians of {len(c['runs'])} runs")  # fmt: skip
    print(f"{'':24}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for name, m in (("parse-only ceiling", c), ("agent POST /diffuse", a)):
        print(f"{name:24}{m['rps']:>10.0f}{m['p50_ms']:>10.3f}{m['p99_ms']:>10.3f}"
              f"{m['errors']:>8.0f}")  # fmt: skip
    t = r["targets"]
    print(f"ratio /diffuse / ceiling   {r['ratio']:.2f}   (target >= {t['ratio']:.2f})")
    print(f"agent p99                  {a['p99_ms']:.2f} ms (target <= {t['p99_ms']:.0f} ms)")
    print(f"agent RSS idle / load      {a['rss_idle_mb']:.1f} / {a['rss_load_mb']:.1f} MB "
          f"(target idle <= {t['rss_idle_mb']:.0f} MB)")  # fmt: skip
    print(f"start to /healthz 200      {a['ready_s']:.2f} s (target <= {t['ready_s']} s)")
