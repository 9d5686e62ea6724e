"""A hypothesis state machine of the outbox against a simple model: enqueue, page through
pending, receipt, eviction by size, crash (no clean shutdown) and reopen."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dgdm.sync import envelope as env
from dgdm.sync.envelope import PRIORITY, Kind
from dgdm.sync.errors import OutboxFull
from dgdm.sync.outbox import Outbox

MAX_BYTES = 96 * 1024  # 48 KiB for rows after the fixed pages: a few messages fill it
KINDS = [Kind.ALERT, Kind.REPLY, Kind.RESULT, Kind.TELEMETRY]


def sealer(kind, seq, created_ms, body):
    return env.seal(
        kind, seq, created_ms, "dev", body, key=bytes(32), key_id=b"abcd", compress=False
    )


class OutboxMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-sm-"))
        self.box = self._open()
        self.model: dict[int, Kind] = {}  # seq -> kind of every message not yet receipted
        self.issued: list[int] = []
        self.evicted = 0
        self.refused = 0

    def _open(self) -> Outbox:
        return Outbox(self.dir / "outbox.db", device_id="dev", sealer=sealer, max_bytes=MAX_BYTES)

    def _actual(self) -> list[tuple[int, int]]:
        return [(m.priority, m.seq) for m in self.box.pending(10_000)]

    def _sync_evictions(self) -> dict[int, Kind]:
        """Messages the model has and the outbox lost: only evictions may explain them."""
        actual = {seq for _, seq in self._actual()}
        assert actual <= set(self.model), "the outbox holds a seq nobody enqueued"
        gone = {seq: kind for seq, kind in self.model.items() if seq not in actual}
        for seq in gone:
            del self.model[seq]
        self.evicted += len(gone)
        return gone

    @rule(kind=st.sampled_from(KINDS), size=st.integers(0, 6000))
    def enqueue(self, kind: Kind, size: int) -> None:
        try:
            seq = self.box.enqueue(kind, {"pad": "x" * size})
        except OutboxFull:
            self.refused += 1
            assert not self._sync_evictions(), "a refused message must not evict anything"
            return
        assert not self.issued or seq > self.issued[-1]
        self.issued.append(seq)
        self.model[seq] = kind
        gone = self._sync_evictions()
        if gone:
            self._check_eviction_order(gone, kind, seq)

    @rule(kind=st.sampled_from(KINDS), size=st.integers(1000, 6000))
    def enqueue_large(self, kind: Kind, size: int) -> None:
        self.enqueue(kind, size)

    def _check_eviction_order(self, gone: dict[int, Kind], incoming: Kind, new_seq: int) -> None:
        most_urgent = min(PRIORITY[k] for k in gone.values())
        assert most_urgent >= PRIORITY[incoming], "evicted something more urgent than the newcomer"
        for seq, kind in self.model.items():
            if seq == new_seq:
                continue
            # Every less urgent tier had to be emptied before this one was touched.
            assert PRIORITY[kind] <= most_urgent, f"{kind.name} {seq} outlived an evicted tier"
            # Within a tier, the oldest go first.
            same_tier = [g for g, k in gone.items() if PRIORITY[k] == PRIORITY[kind]]
            assert all(g < seq for g in same_tier), f"{seq} survived an older eviction"

    @rule(data=st.data())
    @precondition(lambda self: self.issued)
    def receipt(self, data) -> None:
        first = data.draw(st.sampled_from(self.issued))
        last = first + data.draw(st.integers(0, 5))
        self._sync_evictions()
        expected = [s for s in self.model if first <= s <= last]
        assert self.box.apply_receipt([(first, last)]) == len(expected)
        for seq in expected:
            del self.model[seq]

    @rule(limit=st.integers(1, 7))
    def page_through_pending(self, limit: int) -> None:
        self._sync_evictions()
        seen, cursor = [], None
        while page := self.box.pending(limit, after=cursor):
            assert len(page) <= limit
            seen += [(m.priority, m.seq) for m in page]
            cursor = seen[-1]
        assert seen == sorted((PRIORITY[k], s) for s, k in self.model.items())

    @rule()
    def crash_and_reopen(self) -> None:
        self.box._shutdown(checkpoint=False)  # a crash: no checkpoint, WAL left as it is
        self.box = self._open()
        assert {s for _, s in self._actual()} == set(self.model)

    @rule()
    def close_and_reopen(self) -> None:
        self.box.close()
        self.box = self._open()
        assert {s for _, s in self._actual()} == set(self.model)

    @invariant()
    def accounting(self) -> None:
        stats = self.box.stats()
        assert stats.messages == len(self.model)
        assert stats.bytes <= MAX_BYTES
        assert stats.dropped == self.evicted + self.refused

    def teardown(self) -> None:
        self.box.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestOutboxMachine = OutboxMachine.TestCase
TestOutboxMachine.settings = settings(max_examples=30, stateful_step_count=50, deadline=None)
