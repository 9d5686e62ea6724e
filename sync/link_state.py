"""The device link's send decisions, free of I/O: what to send next, what to resend, when.

The outbox is read in send order (priority, then seq) through a cursor. A message is
"sent" from its publish until a receipt covers it; a PUBACK changes nothing here, because
only the coordinator's receipt makes a message safe (SPEC §5). A message leaves the sent
set — and is sent again — when its receipt is late (`receipt_timeout_s`) or the connection
is replaced (everything unreceipted goes again). Two faster signals say a message was lost
while the broker PUBACKed it: a gap (`receipted`: a receipt covers a message of a kind sent
after one of the same kind that no receipt covered; the coordinator stores each device's
messages of one kind in arrival order, so after `GAP_GRACE_S` the earlier one was dropped),
and a coordinator that (re)appeared (`presumed_lost`, decided in presence.py): what was sent
before it appeared may have gone to nobody. Whenever something earlier in send order
needs sending (a resend, or a newly queued more urgent message) the cursor rewinds to it;
pages re-read after a rewind skip what is still in the sent set.

Time is passed in (monotonic seconds); nothing here sleeps, reads or publishes. `plan()`
captures where the next read starts as an immutable `ReadPlan`, so that a worker thread can
do the whole read (urgent checks, then the page) in one hop while the loop carries on.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass

Cursor = tuple[int, int]  # (priority, seq) of the last message passed in send order
# A gap is lost only this long after it was seen, or twice the recent receipt latency if
# that is longer: with several coordinators (a shared subscription) one device's messages
# are split among them, and a slower one's receipt for the earlier message may still be on
# its way.
GAP_GRACE_S = 1.0
LATENCY_DECAY = 0.9  # per receipt: the latency estimate follows a slow coordinator at once
# Gap resends per `expire` call (once a second): a coordinator that drops on purpose (over
# quota) must not turn every receipt into a burst of resends.
MAX_GAP_RESENDS = 500


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
        self._repeats: set[int] = set()  # seqs in the sent set whose send was a resend
        # Per kind, the unreceipted seqs of this connection in send order (dicts keep
        # insertion order; a resend is inserted again at the end) -> their send number.
        self._lanes: dict[int, dict[int, int]] = {}
        self._sends = 0
        self._gaps: dict[int, float] = {}  # seq -> when a later send of its kind was receipted
        self._gap_resent: set[int] = set()  # at most one gap resend per seq per connection
        self.sent_total = 0
        self.resent_total = 0
        self.gap_resent_total = 0
        self.receipt_latency_s = 0.0  # a decaying maximum of send -> receipt

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

    def mark_sent(self, priority: int, seq: int, now: float, kind: int) -> None:
        self._sent[seq] = (priority, now)
        self._sends += 1
        self._lanes.setdefault(kind, {})[seq] = self._sends
        self.sent_total += 1
        if seq in self._again:
            self._again.discard(seq)
            self._repeats.add(seq)
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
        self._repeats.clear()
        self._lanes.clear()
        self._gaps.clear()
        self._gap_resent.clear()
        self.cursor = None
        self.generation += 1

    def expire(self, now: float) -> tuple[int, int]:
        """Forget sends whose receipt is overdue, and gaps older than GAP_GRACE_S (at most
        MAX_GAP_RESENDS), rewinding to the earliest; returns (late, gaps) counts."""
        deadline = now - self.receipt_timeout_s
        late = [seq for seq, (_, at) in self._sent.items() if at <= deadline]
        gap_deadline = now - max(GAP_GRACE_S, 2 * self.receipt_latency_s)
        gaps = [seq for seq, at in self._gaps.items() if at <= gap_deadline and seq in self._sent][
            :MAX_GAP_RESENDS
        ]
        self._gap_resent.update(gaps)
        self.gap_resent_total += len(gaps)
        gone = set(late) | set(gaps)
        self._forget(gone)
        return len(gone) - len(gaps), len(gaps)

    def first_send_covered(self, ranges: Iterable[tuple[int, int]]) -> float | None:
        """When the latest message a receipt covers was sent, among those sent only once
        (so the coordinator stored this very copy, after it left), or None: the receipt was
        stamped after that instant, which makes it a clock sample (clock.py)."""
        latest = None
        for first, last in ranges:
            for seq in _within(self._sent, first, last):
                if seq not in self._repeats:
                    at = self._sent[seq][1]
                    latest = at if latest is None else max(latest, at)
        return latest

    def presumed_lost(self, sent_before: float) -> int:
        """A coordinator (re)appeared at `sent_before`: what was sent until then may have
        gone to nobody, so whatever of it is still unreceipted goes again; returns count."""
        lost = {seq for seq, (_, at) in self._sent.items() if at <= sent_before}
        self._forget(lost)
        return len(lost)

    def _forget(self, seqs: set[int]) -> None:
        """Out of the sent set and into the resend set, rewinding to the earliest."""
        if not seqs:
            return
        earliest = min((self._sent[seq][0], seq) for seq in seqs)
        for seq in seqs:
            del self._sent[seq]
            self._gaps.pop(seq, None)
            self._repeats.discard(seq)
            self._again.add(seq)
        for lane in self._lanes.values():
            for seq in seqs & lane.keys():
                del lane[seq]
        self.rewind(*earliest)

    def receipted(self, ranges: Iterable[tuple[int, int]], now: float) -> int:
        """Receipted seqs are done: out of the sent set, and out of the resend set too (a
        receipt that lands after a reconnect covers messages that will never be read again).
        A seq of a kind sent on this connection before a receipted one of the same kind is a
        gap (the coordinator keeps each device's kind in order); returns the new gaps."""
        done: list[int] = []
        oldest = now
        for first, last in ranges:
            for seq in _within(self._sent, first, last):
                oldest = min(oldest, self._sent.pop(seq)[1])
                self._repeats.discard(seq)
                done.append(seq)
            for seq in _within(self._again, first, last):
                self._again.discard(seq)
        self.receipt_latency_s = max(now - oldest, self.receipt_latency_s * LATENCY_DECAY)
        new_gaps = 0
        for lane in self._lanes.values():
            latest = max((lane[seq] for seq in done if seq in lane), default=0)
            for seq in done:
                lane.pop(seq, None)
            for seq, order in lane.items():
                if order > latest:
                    break
                if seq not in self._gaps and seq not in self._gap_resent:
                    self._gaps[seq] = now
                    new_gaps += 1
        for seq in done:
            self._gaps.pop(seq, None)
        return new_gaps


def _within(seqs: dict[int, tuple[int, float]] | set[int], first: int, last: int) -> list[int]:
    """The members of `seqs` in [first, last], walking whichever of the two is smaller."""
    if last - first < len(seqs):
        return [s for s in range(first, last + 1) if s in seqs]
    return [s for s in seqs if first <= s <= last]


# How far below the highest executed command seq one may still arrive and run.
COMMAND_WINDOW = 1024


@dataclass(frozen=True)
class ExecutedCommands:
    """Which command seqs have run (SPEC §6: each at most once).

    The coordinator allocates seqs in order, but they may arrive out of order: two replicas
    publish side by side, a stopped replica or a broker reconnect delays one publish, a lost
    claim is published again. So a high-water mark would drop a late lower seq as a replay
    and never answer it. Instead every seq up to `floor` has run (or is too old to run), and
    `above` holds those above it that ran; the floor climbs over contiguous runs and never
    lags the highest executed seq by more than COMMAND_WINDOW, which bounds `above`.
    """

    floor: int = 0  # the coordinator allocates command seqs from 1
    above: frozenset[int] = frozenset()
    # The seq that started and has no reply queued yet: after a crash it is answered as
    # interrupted (never run again), so every command that ran gets a reply.
    running: int | None = None

    def seen(self, seq: int) -> bool:
        return seq <= self.floor or seq in self.above

    def add(self, seq: int) -> ExecutedCommands:
        above = set(self.above)
        above.add(seq)
        floor = self.floor
        while floor + 1 in above:
            floor += 1
            above.discard(floor)
        floor = max(floor, max(above, default=floor) - COMMAND_WINDOW)
        return ExecutedCommands(floor, frozenset(s for s in above if s > floor), self.running)

    def start(self, seq: int) -> ExecutedCommands:
        """`seq` ran (see `add`) and is running now."""
        return dataclasses.replace(self.add(seq), running=seq)

    def replied(self) -> ExecutedCommands:
        return dataclasses.replace(self, running=None)

    def encode(self) -> str:
        return json.dumps(
            {"floor": self.floor, "above": sorted(self.above), "running": self.running}
        )

    @classmethod
    def decode(cls, text: str | None) -> ExecutedCommands:
        """The persisted form; a bare integer is the older one (the last executed seq: it
        and everything below it ran)."""
        if text is None:
            return cls()
        value = json.loads(text)
        if isinstance(value, int):
            return cls(value)
        running = value.get("running")
        return cls(
            int(value["floor"]),
            frozenset(int(s) for s in value["above"]),
            None if running is None else int(running),
        )
