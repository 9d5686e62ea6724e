"""Durable enqueue rate of the outbox: grouped commits vs one FULL commit per row.

Both halves run in the same call on the same disk, so the ratio holds even when the
absolute numbers move with the machine's load. Run by `dgdm bench sync`, or directly:
``python -m dgdm.sync.bench_outbox --n 20000 --producers 32 --repeat 3``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dgdm.sync.envelope import Kind, seal
from dgdm.sync.outbox import Outbox

DEVICE = "bench-0001"
# A telemetry sample of about the size the agent sends (~300 bytes once sealed).
BODY = {
    "samples": [
        {
            "ts_ms": 1_700_000_000_000,
            "cpu_percent": 12.5,
            "mem_used_bytes": 734_003_200,
            "mem_total_bytes": 4_294_967_296,
            "load1": 0.42,
            "disk_free_bytes": 12_884_901_888,
            "tpu": {"present": False, "temp_c": None},
            "outbox": {"messages": 0, "bytes": 0, "dropped": 0},
            "diffusions": 1234,
            "latency_p50_ms": 1.7,
            "latency_p99_ms": 4.2,
        }
    ]
}
BASELINE_MAX_ROWS = 3000
# The enqueue_many variant: a few producers handing over 64 messages per call.
BATCHED_PRODUCERS = 4
BATCHED_PER_CALL = 64
# The agent's path: coroutines on one loop awaiting `enqueue_async`.
ASYNC_PRODUCERS = 256


def _sealer(key: bytes) -> Callable[[Kind, int, int, Any], bytes]:
    def sealer(kind: Kind, seq: int, created_ms: int, body: Any) -> bytes:
        return seal(kind, seq, created_ms, DEVICE, body, key=key, key_id=b"\0\0\0\1")

    return sealer


def bench_enqueue(
    path: str | os.PathLike[str], n: int = 20_000, producers: int = 32
) -> dict[str, Any]:
    """Durable, sealed enqueues/s: msg_s = async_msg_s (the agent's path: `enqueue_async`
    from ASYNC_PRODUCERS coroutines on one loop), grouped_msg_s (one `enqueue` per call from
    `producers` threads, sharing commits), enqueue_many_msg_s (64 per call from 4 threads),
    the one-row-per-FULL-commit baseline single_commit_msg_s, and ratio = msg_s /
    single_commit_msg_s."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    asynchronous = asyncio.run(_async(root / "async.db", n, ASYNC_PRODUCERS))
    grouped = _grouped(root / "grouped.db", n, producers)
    batched = _grouped(root / "batched.db", n, BATCHED_PRODUCERS, BATCHED_PER_CALL)
    single = _single_row(root / "single.db", min(n, BASELINE_MAX_ROWS))
    return {
        "msg_s": asynchronous,
        "async_msg_s": asynchronous,
        "grouped_msg_s": grouped,
        "enqueue_many_msg_s": batched,
        "single_commit_msg_s": single,
        "ratio": asynchronous / single if single else None,
        "n": n,
        "producers": producers,
        "payload_bytes": len(_sealer(bytes(32))(Kind.TELEMETRY, 1, 1, BODY)),
    }


def _grouped(path: Path, n: int, producers: int, per_call: int = 1) -> float:
    """`producers` threads each enqueue n/producers messages, `per_call` at a time."""
    _remove(path)
    box = Outbox(path, device_id=DEVICE, sealer=_sealer(os.urandom(32)), max_bytes=1 << 30)
    per = max(per_call, n // producers // per_call * per_call)
    start = threading.Barrier(producers + 1)
    items = [(Kind.TELEMETRY, BODY)] * per_call

    def produce() -> None:
        start.wait()
        for _ in range(per // per_call):
            if per_call == 1:
                box.enqueue(Kind.TELEMETRY, BODY)
            else:
                box.enqueue_many(items)

    threads = [threading.Thread(target=produce) for _ in range(producers)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    box.close()
    _remove(path)
    return per * producers / elapsed


async def _async(path: Path, n: int, producers: int) -> float:
    """`producers` coroutines each await n/producers `enqueue_async` calls in turn."""
    _remove(path)
    box = Outbox(path, device_id=DEVICE, sealer=_sealer(os.urandom(32)), max_bytes=1 << 30)
    per = max(1, n // producers)

    async def produce() -> None:
        for _ in range(per):
            await box.enqueue_async(Kind.TELEMETRY, BODY)

    began = time.perf_counter()
    await asyncio.gather(*(produce() for _ in range(producers)))
    elapsed = time.perf_counter() - began
    box.close()
    _remove(path)
    return per * producers / elapsed


def _single_row(path: Path, n: int) -> float:
    """The baseline: the same sealed rows, one synchronous=FULL WAL commit each."""
    _remove(path)
    payload = _sealer(os.urandom(32))(Kind.TELEMETRY, 1, 1, BODY)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE messages (seq INTEGER PRIMARY KEY, priority INTEGER, kind INTEGER, "
        "created_ms INTEGER, size INTEGER, payload BLOB)"
    )
    conn.execute("CREATE INDEX messages_order ON messages (priority, seq)")
    began = time.perf_counter()
    for seq in range(1, n + 1):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO messages VALUES (?, 3, 2, 0, ?, ?)", (seq, len(payload), payload))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - began
    conn.close()
    _remove(path)
    return n / elapsed


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", ".ballast"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--producers", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where the files go")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        runs = [bench_enqueue(tmp, args.n, args.producers) for _ in range(args.repeat)]
    keys = ("async_msg_s", "grouped_msg_s", "enqueue_many_msg_s", "single_commit_msg_s", "ratio")
    print(json.dumps({k: round(statistics.median(r[k] for r in runs), 2) for k in keys}))


if __name__ == "__main__":
    main()
