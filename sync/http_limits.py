"""Bounds on what HTTP clients can hold: connections, body bytes in memory, slow bodies.

Pure decisions (counts, bytes and times in, decisions out) for the agent's and the
coordinator's HTTP servers; sync/listener.py and sync/http_guard.py do the I/O. Without
them a client that opens connections and never finishes its headers, or drips a large
body, holds a file descriptor and memory for as long as it likes: 1,010 half-open
connections took a 1024-fd agent (and the coordinator's API) down entirely.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

# File descriptors kept out of the connection cap: the agent's outbox database and its
# WAL, the MQTT socket, the parser process's pipes, the listening socket, logs, the TPU;
# the coordinator's store connections (SQLite files or PostgreSQL sockets) and MQTT socket.
FD_RESERVE = 64
# asyncio accepts up to the listen backlog in one go before any of those connections is
# seen (and a cap can close one), so that many more descriptors may be open for a moment.
ACCEPT_BACKLOG = 128


def connection_cap(configured: int, fd_soft_limit: int) -> int:
    """At most `configured` connections, and never so many that the process runs out of
    descriptors: accept() failing with EMFILE is the outage this cap prevents."""
    return max(1, min(configured, fd_soft_limit - FD_RESERVE - ACCEPT_BACKLOG))


class ConnectionTable:
    """Open connections by peer address, and which are idle (no request in progress).

    A new connection over a cap (in total or for its peer) evicts the connection of that
    scope that has been idle longest: a half-open or idle keep-alive connection costs its
    owner nothing to hold, a live request does. Only when every connection in the scope is
    busy is the new one refused. Keys are any hashable handle (the transport)."""

    def __init__(self, max_total: int, max_per_peer: int) -> None:
        self.max_total = max_total
        self.max_per_peer = max_per_peer
        self._peer: dict[Hashable, str | None] = {}
        self._per_peer: Counter[str] = Counter()
        self._idle: OrderedDict[Hashable, None] = OrderedDict()  # longest idle first
        self._idle_by_peer: dict[str, OrderedDict[Hashable, None]] = {}

    def __len__(self) -> int:
        return len(self._peer)

    def admit(self, key: Hashable, peer: str | None) -> tuple[bool, Hashable | None]:
        """(admitted, connection to close now). Admitted connections start idle. A peer of
        None has no cap of its own (loopback: every local process is the same address)."""
        victim = None
        if peer is not None and self._per_peer[peer] >= self.max_per_peer:
            victim = next(iter(self._idle_by_peer.get(peer, ())), None)
            if victim is None:
                return False, None
        elif len(self._peer) >= self.max_total:
            victim = next(iter(self._idle), None)
            if victim is None:
                return False, None
        if victim is not None:
            self.remove(victim)
        self._peer[key] = peer
        if peer is not None:
            self._per_peer[peer] += 1
        self.idle(key)
        return True, victim

    def busy(self, key: Hashable) -> None:
        """A request is in progress on it: not to be evicted."""
        self._idle.pop(key, None)
        peer = self._peer.get(key)
        by_peer = self._idle_by_peer.get(peer) if peer is not None else None
        if by_peer is not None:
            by_peer.pop(key, None)

    def idle(self, key: Hashable) -> None:
        if key not in self._peer:
            return  # closed meanwhile
        self._idle[key] = None
        peer = self._peer[key]
        if peer is not None:
            self._idle_by_peer.setdefault(peer, OrderedDict())[key] = None

    def remove(self, key: Hashable) -> None:
        if key not in self._peer:
            return
        self.busy(key)
        peer = self._peer.pop(key)
        if peer is None:
            return
        if not self._idle_by_peer.get(peer, True):
            del self._idle_by_peer[peer]
        self._per_peer[peer] -= 1
        if self._per_peer[peer] <= 0:
            del self._per_peer[peer]


def body_too_slow(
    received: int, expected: int | None, elapsed_s: float, min_rate: float, grace_s: float
) -> bool:
    """Whether a body still arriving is slower than `min_rate` bytes/s after `grace_s`:
    by then it must have `min_rate * (elapsed - grace)` bytes, or all of it. A body of
    known size so gets a deadline of grace + size / min_rate."""
    if elapsed_s <= grace_s:
        return False
    needed = min_rate * (elapsed_s - grace_s)
    if expected is not None:
        needed = min(needed, expected)
    return received < needed


@dataclass
class BodyBudget:
    """Request body bytes that may be buffered at once, across all requests."""

    limit: int
    used: int = 0

    def reserve(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        self.used = max(0, self.used - size)


def default_body_budget(mem_total_bytes: int | None, max_body_bytes: int) -> int:
    """256 MiB, or an eighth of the memory on a small box; never below one largest body."""
    budget = 256 << 20
    if mem_total_bytes:
        budget = min(budget, mem_total_bytes // 8)
    return max(budget, max_body_bytes)
