"""`dgdm bench http`'s wrk side: the output parser, and a short real wrk run."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dgdm.agent.bench import _wait_http, _wrk, bench_graph, parse_wrk
from dgdm.sync.broker import free_port

WRK_OUTPUT = """Running 5s test @ http://127.0.0.1:18080/parse
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     9.23ms    3.19ms  40.38ms   87.00%
    Req/Sec     3.53k   722.11     4.53k    70.00%
  Latency Distribution
     50%  812.00us
     75%    9.68ms
     90%   13.44ms
     99%    1.20s
  17575 requests in 5.00s, 2.87MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   3513.62
Transfer/sec:    586.75KB
"""


def test_parse_wrk_reads_rate_percentiles_in_their_units_and_errors() -> None:
    assert parse_wrk(WRK_OUTPUT) == {
        "requests": 17575,
        "errors": 7,
        "rps": 3513.62,
        "p50_ms": 0.812,
        "p99_ms": 1200.0,
    }


def test_parse_wrk_refuses_output_it_does_not_know() -> None:
    with pytest.raises(RuntimeError, match="unexpected wrk output"):
        parse_wrk("wrk: invalid URL\n")


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt install wrk)")
def test_a_short_wrk_run_against_the_parse_only_ceiling(tmp_path: Path) -> None:
    (tmp_path / "graph.json").write_bytes(bench_graph(20, 4))
    port = free_port()
    code = f"from dgdm.agent.bench import serve_parse_only; serve_parse_only({port})"
    server = subprocess.Popen([sys.executable, "-c", code])
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", server, 20.0)
        args = argparse.Namespace(wrk=shutil.which("wrk"), connections=4)
        gen = _wrk(args, tmp_path, f"http://127.0.0.1:{port}/parse", 1.0)
        out, _ = gen.communicate(timeout=30)
    finally:
        server.terminate()
        server.wait(10)
    measured = parse_wrk(out)
    assert measured["errors"] == 0
    assert measured["requests"] > 10
    assert 0 < measured["p50_ms"] <= measured["p99_ms"]
