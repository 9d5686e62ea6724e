"""Feed a (sanitizer-built) `_graphscan` extension many inputs; run in its own process.

    python fuzz_graphscan.py MODULE.so COUNT SEED

MODULE.so is loaded as `dgdm.kernels._graphscan` before anything imports the installed one,
so `parse_graph_bytes` runs the build under test. Each input is checked with the oracle of
tests/kernels/test_graphscan.py (the same Graph bit for bit, or the same error, as the
general parser) and the scanner must never raise. Hypothesis generates graph documents
(the strategies of test_graphscan.py); each is checked as encoded and as byte-level
mutations of it (bytes flipped, JSON punctuation inserted, runs cut, truncated, spliced);
the remainder mutates the usual bench body. Prints `inputs: N accepted: K` on success; an
AddressSanitizer or UBSan report aborts the process (non-zero exit), the report on stderr.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import random
import sys
from pathlib import Path
from typing import Any


def load_as_graphscan(path: str) -> Any:
    name = "dgdm.kernels._graphscan"
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[name] = module
    return module


def load_oracle() -> Any:
    path = Path(__file__).resolve().parents[1] / "kernels" / "test_graphscan.py"
    spec = importlib.util.spec_from_file_location("graphscan_oracle", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Inputs at the scanner's own limits, checked first in every run.
CORPUS = (
    [
        b'{"nodes":[{"id":0,"features":[%s]}]}' % literal
        for literal in (
            b"1" * 63,
            b"1" * 64,
            b"1" * 65,
            b"0." + b"3" * 80,
            b"1e" + b"9" * 70,
            b"-" + b"9" * 200,
            b"1" * 19,
            b"9" * 20,
            b"18446744073709551616",
            b"4.9e-324",
            b"2e-400",
            b"1e309",
        )
    ]
    + [
        b'{"nodes":[{"id":%s}]}' % literal
        for literal in (b"999999999999999999", b"-999999999999999999", b"9223372036854775808")
    ]
    + [
        b'{"nodes":[{"id":0}],"method":' + b"[" * depth + b"]" * depth + b"}"
        for depth in (64, 65, 66)
    ]
    + [b'{"nodes":[{"id":0,"features":[1.5', b"{", b"", b'{"nodes":[{"id":"', b'"\\']
)


def mutate(rng: random.Random, body: bytes, punctuation: list[bytes]) -> bytes:
    out = bytearray(body)
    for _ in range(rng.randint(1, 6)):
        at = rng.randint(0, len(out))
        op = rng.randrange(5)
        if op == 0 and at < len(out):
            out[at] = rng.randrange(256)
        elif op == 1:
            out[at:at] = rng.choice(punctuation)
        elif op == 2:
            del out[at : at + rng.randint(1, 8)]
        elif op == 3:
            del out[at:]  # truncated: every scanner loop must stop at the end
        else:
            start = rng.randint(0, len(out))
            out[at:at] = out[start : start + rng.randint(1, 24)]  # a splice of itself
    return bytes(out)


def main() -> int:
    so_path, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    scanner = load_as_graphscan(so_path)
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st

    from dgdm.kernels import graph

    assert graph._graphscan is scanner, "the installed scanner answered, not the one under test"
    oracle = load_oracle()
    done = 0
    accepted = 0

    def check(body: bytes, decode_name: str = "agent") -> None:
        nonlocal done, accepted
        scanned = scanner.scan(body)  # never raises on input
        accepted += scanned is not None
        oracle.assert_same(body, decode_name)
        done += 1

    from dgdm.agent.bench import bench_graph

    # Hypothesis generates the documents (its cost per example is ~10x a check's), and each
    # is checked as encoded and as MUTATIONS byte-mutated copies of itself.
    mutations = 9
    per_example = 1 + mutations

    @hypothesis_seed(seed)
    @settings(
        max_examples=max(1, count // per_example),
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        doc=oracle.documents(),
        style=st.integers(0, 3),
        decode=st.sampled_from(["agent", "stdlib"]),
        rng=st.randoms(use_true_random=False),
    )
    def documents(doc: dict[str, Any], style: int, decode: str, rng: random.Random) -> None:
        body = oracle.encode(doc, style)
        check(body, decode)
        for _ in range(mutations):
            check(mutate(rng, body, oracle.JSON_PUNCTUATION))

    for body in CORPUS:
        check(body)
    documents()
    rng = random.Random(seed)
    bench = bench_graph(20, 3)  # the usual body: ints 0..N-1, features, weights
    while done < count:
        check(mutate(rng, bench, oracle.JSON_PUNCTUATION))
    print(f"inputs: {done} accepted: {accepted}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
