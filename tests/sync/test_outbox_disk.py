"""A full disk (a 2 MiB tmpfs) must not wedge the outbox: reads and deletes keep working,
new messages are refused with StorageFull, and it takes messages again once space returns."""

from __future__ import annotations

import time

import pytest

from dgdm.sync import envelope as env
from dgdm.sync.envelope import Kind
from dgdm.sync.errors import StorageFull
from dgdm.sync.outbox import Outbox


def sealer(kind, seq, created_ms, body):
    return env.seal(
        kind, seq, created_ms, "dev", body, key=bytes(32), key_id=b"abcd", compress=False
    )


@pytest.fixture
def small_disk(tmp_path, mount_tmpfs):
    return mount_tmpfs(tmp_path / "disk", "2m")


def _fill_until_full(box: Outbox, kind: Kind = Kind.ALERT) -> list[int]:
    seqs = []
    for _ in range(10_000):
        try:
            seqs.append(box.enqueue(kind, {"pad": "x" * 2000}))
        except StorageFull:
            return seqs
    raise AssertionError("a 2 MiB disk never filled up")


def _eventually_accepts(box: Outbox, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return box.enqueue(Kind.ALERT, {"after": "recovery"})
        except StorageFull:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_full_disk_keeps_reads_and_deletes_and_recovers_after_receipts(small_disk) -> None:
    box = Outbox(
        small_disk / "outbox.db",
        device_id="dev",
        sealer=sealer,
        max_bytes=64 << 20,
        ballast_bytes=256 * 1024,
    )
    seqs = _fill_until_full(box)
    assert len(seqs) > 200
    assert box.stats().storage_full
    with pytest.raises(StorageFull):
        box.enqueue(Kind.ALERT, {"pad": "y"})
    # Reads work and nothing durable was lost.
    assert [m.seq for m in box.pending(100_000)] == seqs
    # Deletes work: the coordinator's receipt for most of the queue lands.
    assert box.apply_receipt([(seqs[0], seqs[-20])]) == len(seqs) - 19
    assert [m.seq for m in box.pending(100_000)] == seqs[-19:]
    # The freed pages go back to the file system and the outbox takes messages again.
    new = _eventually_accepts(box)
    assert new > seqs[-1]
    assert not box.stats().storage_full
    box.close()
    reopened = Outbox(small_disk / "outbox.db", device_id="dev", sealer=sealer, max_bytes=64 << 20)
    assert [m.seq for m in reopened.pending(100)] == [*seqs[-19:], new]
    reopened.close()


def test_full_disk_caused_by_someone_else_recovers_when_they_free_it(small_disk) -> None:
    box = Outbox(
        small_disk / "outbox.db",
        device_id="dev",
        sealer=sealer,
        max_bytes=64 << 20,
        ballast_bytes=128 * 1024,
    )
    first = box.enqueue(Kind.RESULT, {"before": "filler"})
    filler = small_disk / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(bytes(64 * 1024))
                handle.flush()
        except OSError:
            pass  # the disk is full now
    seqs = _fill_until_full(box, Kind.RESULT)
    assert box.stats().storage_full
    assert [m.seq for m in box.pending(100)][:1] == [first]
    filler.unlink()
    new = _eventually_accepts(box)
    assert new > max([first, *seqs])
    box.close()
