"""SIGKILL a process that enqueues (and receipts) in a loop; every seq it was told is durable
must be there after reopen, receipted ones gone, and no seq is ever handed out twice."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from dgdm.sync import envelope as env
from dgdm.sync.envelope import Kind
from dgdm.sync.outbox import Outbox

CHILD = textwrap.dedent(
    """
    import random, sys, threading
    from dgdm.sync import envelope as env
    from dgdm.sync.outbox import Outbox

    def sealer(kind, seq, created_ms, body):
        return env.seal(kind, seq, created_ms, "dev", body, key=bytes(32), key_id=b"abcd")

    box = Outbox(sys.argv[1], device_id="dev", sealer=sealer, max_bytes=1 << 30)
    lock = threading.Lock()

    def say(line):
        with lock:
            sys.stdout.write(line + "\\n")
            sys.stdout.flush()

    def produce(i):
        rng = random.Random(i)
        kinds = [env.Kind.ALERT, env.Kind.RESULT, env.Kind.TELEMETRY, env.Kind.REPLY]
        while True:
            seq = box.enqueue(rng.choice(kinds), {"pad": "x" * rng.randint(0, 3000)})
            say(f"E {seq}")
            if rng.random() < 0.05:
                say(f"R {seq - 3} {seq}")  # announced first: it may apply and then die
                box.apply_receipt([(seq - 3, seq)])

    say("READY")
    for i in range(4):
        threading.Thread(target=produce, args=(i,), daemon=True).start()
    threading.Event().wait()
    """
)


def _round(path, rng: random.Random) -> tuple[list[int], list[tuple[int, int]]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "READY"
    first = proc.stdout.readline()  # killed only once it is under way, however loaded the host
    time.sleep(rng.uniform(0.0, 0.5))
    os.kill(proc.pid, signal.SIGKILL)
    # Read through the same buffered file: communicate() would read the raw pipe and miss
    # lines readline() had already buffered.
    out = first + proc.stdout.read()
    proc.stdout.close()
    proc.wait(timeout=30)
    enqueued, receipted = [], []
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == "E" and len(parts) == 2:
            enqueued.append(int(parts[1]))
        elif parts and parts[0] == "R" and len(parts) == 3:
            receipted.append((int(parts[1]), int(parts[2])))
    return enqueued, receipted


def _check_rounds(tmp_path, rounds: int) -> None:
    path = tmp_path / "outbox.db"
    rng = random.Random(rounds)
    all_seqs: list[int] = []
    receipted: list[tuple[int, int]] = []
    for _ in range(rounds):
        seqs, receipts = _round(path, rng)
        assert seqs, "the child made no progress before it was killed"
        assert not set(seqs) & set(all_seqs), "a seq was handed out twice"
        all_seqs += seqs
        receipted += receipts
        box = Outbox(path, device_id="dev", sealer=_sealer, max_bytes=1 << 30)
        stored = {m.seq for m in box.pending(10**6)}
        box.close()
        gone = {s for s in all_seqs if any(a <= s <= b for a, b in receipted)}
        missing = set(all_seqs) - gone - stored
        assert not missing, f"durable seqs lost after SIGKILL: {sorted(missing)[:10]}"
    assert len(all_seqs) == len(set(all_seqs))


def _sealer(kind, seq, created_ms, body):
    return env.seal(Kind(kind), seq, created_ms, "dev", body, key=bytes(32), key_id=b"abcd")


@pytest.mark.slow
def test_sigkill_loses_no_durable_seq_and_never_reuses_one(tmp_path) -> None:
    _check_rounds(tmp_path, 3)


@pytest.mark.soak
def test_sigkill_soak_fifty_rounds(tmp_path) -> None:
    _check_rounds(tmp_path, 50)
