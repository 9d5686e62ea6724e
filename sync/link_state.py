"""The device link's send decisions, free of I/O: what to send next, what to resend, when.

The outbox is read in send order (priority, then seq) through a cursor. A message is
"sent" from its publish until a receipt covers it; a PUBACK changes nothing here, because
only the coordinator's receipt makes a message safe (SPEC §5). A message leaves the sent
set — and is sent again — when its receipt is late (`receipt_timeout_s`) or the connection
is replaced (everything unreceipted goes again). Whenever something earlier in send order
needs sending (a resend, or a newly queued more urgent message) the cursor rewinds to it;
pages re-read after a rewind skip what is still in the sent set.

Time is passed in (monotonic seconds); nothing here sleeps, reads or publishes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

Cursor = tuple[int, int]  # (priority, seq) of the last message passed in send order


@dataclass
class _Sent:
    priority: int
    at: float


class SendState:
    def __init__(self, receipt_timeout_s: float, max_unreceipted: int) -> None:
        self.receipt_timeout_s = receipt_timeout_s
        self.max_unreceipted = max_unreceipted
        self.cursor: Cursor | None = None
        self.generation = 0  # bumped on every rewind, so a page in progress knows to stop
        self.max_seq_seen = 0
        self._sent: dict[int, _Sent] = {}
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

    def urgent_tiers(self) -> range:
        """Priorities more urgent than the cursor, where a new message would jump ahead."""
        return range(self.cursor[0]) if self.cursor is not None else range(0)

    def is_new_urgent(self, priority: int, seq: int) -> bool:
        return self.cursor is not None and priority < self.cursor[0] and seq > self.max_seq_seen

    # -- events ------------------------------------------------------------------------

    def seen(self, seq: int) -> None:
        self.max_seq_seen = max(self.max_seq_seen, seq)

    def mark_sent(self, priority: int, seq: int, now: float) -> None:
        self._sent[seq] = _Sent(priority, now)
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
        late = [(s.priority, seq) for seq, s in self._sent.items() if s.at <= deadline]
        for _, seq in late:
            del self._sent[seq]
            self._again.add(seq)
        if late:
            self.rewind(*min(late))
        return len(late)

    def receipted(self, ranges: Iterable[tuple[int, int]]) -> None:
        for first, last in ranges:
            if last - first < len(self._sent):
                seqs: Iterable[int] = range(first, last + 1)
            else:
                seqs = [s for s in self._sent if first <= s <= last]
            for seq in seqs:
                self._sent.pop(seq, None)
                self._again.discard(seq)
