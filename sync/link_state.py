"""The device link's send decisions, free of I/O: what to send next, what to resend, when.

The outbox is read in send order (priority, then seq) through a cursor. A message is
"sent" from its publish until a receipt covers it; a PUBACK changes nothing here, because
only the coordinator's receipt makes a message safe (SPEC §5). A message leaves the sent
set — and is sent again — when its receipt is late (`receipt_timeout_s`) or the connection
is replaced (everything unreceipted goes again). Whenever something earlier in send order
needs sending (a resend, or a newly queued more urgent message) the cursor rewinds to it;
pages re-read after a rewind skip what is still in the sent set.

Time is passed in (monotonic seconds); nothing here sleeps, reads or publishes. `plan()`
captures where the next read starts as an immutable `ReadPlan`, so that a worker thread can
do the whole read (urgent checks, then the page) in one hop while the loop carries on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

Cursor = tuple[int, int]  # (priority, seq) of the last message passed in send order


@dataclass(frozen=True)
class ReadPlan:
    """The send state as of one moment: enough to decide a read without the live state."""

    cursor: Cursor | None
    max_seq_seen: int
    generation: int

    def is_new_urgent(self, priority: int, seq: int) -> bool:
        """Queued since the cursor passed its (more urgent) tier: it jumps ahead."""
        return self.cursor is not None and priority < self.cursor[0] and seq > self.max_seq_seen

    def find_urgent(self, first_after: Callable[[Cursor], Cursor | None]) -> Cursor | None:
        """The first new urgent message, or None. `first_after(c)` is the first message in
        send order after c (an outbox read). Each read skips the tiers that hold nothing:
        with only the cursor's tier queued, one read answers for all the tiers above it."""
        if self.cursor is None:
            return None
        tier = 0
        while tier < self.cursor[0]:
            found = first_after((tier, self.max_seq_seen))
            if found is None or found[0] >= self.cursor[0]:
                return None  # nothing at all in the more urgent tiers left to look at
            if self.is_new_urgent(*found):
                return found
            # Its first message was passed already: look for newer ones in that tier.
            tier = max(found[0], tier + 1)
        return None


class SendState:
    def __init__(self, receipt_timeout_s: float, max_unreceipted: int) -> None:
        self.receipt_timeout_s = receipt_timeout_s
        self.max_unreceipted = max_unreceipted
        self.cursor: Cursor | None = None
        self.generation = 0  # bumped on every rewind, so a page in progress knows to stop
        self.max_seq_seen = 0
        self._sent: dict[int, tuple[int, float]] = {}  # seq -> (priority, sent at)
        self._again: set[int] = set()  # seqs that go out again: counted as resends
        self.sent_total = 0
        self.resent_total = 0

    # -- queries -----------------------------------------------------------------------

    @property
    def unreceipted(self) -> int:
        return len(self._sent)

    def window_full(self) -> bool:
        """Stop reading new messages while this many wait for receipts (coordinator down)."""
        return len(self._sent) >= self.max_unreceipted

    def should_send(self, seq: int) -> bool:
        return seq not in self._sent

    def plan(self) -> ReadPlan:
        return ReadPlan(self.cursor, self.max_seq_seen, self.generation)

    def is_new_urgent(self, priority: int, seq: int) -> bool:
        return self.plan().is_new_urgent(priority, seq)

    # -- events ------------------------------------------------------------------------

    def seen(self, seq: int) -> None:
        self.max_seq_seen = max(self.max_seq_seen, seq)

    def mark_sent(self, priority: int, seq: int, now: float) -> None:
        self._sent[seq] = (priority, now)
        self.sent_total += 1
        if seq in self._again:
            self._again.discard(seq)
            self.resent_total += 1

    def advance(self, priority: int, seq: int, generation: int) -> bool:
        """Move the cursor past (priority, seq) unless a rewind happened meanwhile."""
        if generation != self.generation:
            return False
        self.seen(seq)
        self.cursor = (priority, seq)
        return True

    def rewind(self, priority: int, seq: int) -> None:
        """Make (priority, seq) the next message in send order, if it is earlier."""
        target = (priority, seq - 1)
        if self.cursor is not None and target < self.cursor:
            self.cursor = target
            self.generation += 1

    def reconnected(self) -> None:
        """A new connection: what the last one PUBACKed may be lost; send it all again."""
        self._again.update(self._sent)
        self._sent.clear()
        self.cursor = None
        self.generation += 1

    def expire(self, now: float) -> int:
        """Forget sends whose receipt is overdue, rewinding to the earliest; returns count."""
        deadline = now - self.receipt_timeout_s
        late = [(priority, seq) for seq, (priority, at) in self._sent.items() if at <= deadline]
        for _, seq in late:
            del self._sent[seq]
            self._again.add(seq)
        if late:
            self.rewind(*min(late))
        return len(late)

    def receipted(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Receipted seqs are done: out of the sent set, and out of the resend set too (a
        receipt that lands after a reconnect covers messages that will never be read again)."""
        for first, last in ranges:
            for seq in _within(self._sent, first, last):
                del self._sent[seq]
            for seq in _within(self._again, first, last):
                self._again.discard(seq)


def _within(seqs: dict[int, tuple[int, float]] | set[int], first: int, last: int) -> list[int]:
    """The members of `seqs` in [first, last], walking whichever of the two is smaller."""
    if last - first < len(seqs):
        return [s for s in range(first, last + 1) if s in seqs]
    return [s for s in seqs if first <= s <= last]
