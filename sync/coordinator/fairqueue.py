"""The coordinator's ingest queue: bounded per device and in total, drained fairly.

Pure: payloads in, batches out; no I/O, no clock. Messages wait here between the MQTT
socket and the store transaction that decrypts and stores them.

- Each device has its own bounded FIFO per priority tier, so one device's backlog (a box in
  a loop, or a hostile one with its own real key) can fill only its own queue: a message
  beyond the device's bound is refused at once (no receipt, so an honest device resends it).
- A global bound on messages and bytes caps memory whatever the number of devices; when it
  is reached the caller stops reading the socket (`saturated`) until `resumable`.
- `take()` fills one store transaction: tiers in SPEC §5 priority order (alerts, replies,
  results, telemetry), and within a tier one message per device in turn (round robin), so a
  device with a thousand queued messages costs any other device at most one slot per turn.
  Within one device and tier the order is FIFO: a device's seqs of one kind reach the
  store in the order they arrived.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import NamedTuple

from dgdm.sync.envelope import PRIORITY, Kind


class Queued(NamedTuple):
    device_id: str
    kind: Kind
    payload: bytes


@dataclass(frozen=True)
class QueueLimits:
    device_messages: int = 2_000
    device_bytes: int = 8 * 1024 * 1024
    total_messages: int = 200_000
    total_bytes: int = 128 * 1024 * 1024
    # Reading resumes once the queue has drained below this share of either bound.
    resume_ratio: float = 0.5


class _Tier:
    """One priority tier: a FIFO per device and the devices in round-robin order."""

    def __init__(self) -> None:
        self.by_device: dict[str, collections.deque[Queued]] = {}
        self.turn: collections.deque[str] = collections.deque()

    def push(self, item: Queued) -> None:
        fifo = self.by_device.get(item.device_id)
        if fifo is None:
            fifo = self.by_device[item.device_id] = collections.deque()
            self.turn.append(item.device_id)
        fifo.append(item)

    def pop_next(self) -> Queued:
        """The next device's oldest message; the device goes to the back of the line."""
        device_id = self.turn.popleft()
        fifo = self.by_device[device_id]
        item = fifo.popleft()
        if fifo:
            self.turn.append(device_id)
        else:
            del self.by_device[device_id]
        return item


class FairQueue:
    def __init__(self, limits: QueueLimits | None = None) -> None:
        self.limits = limits or QueueLimits()
        self._tiers: dict[int, _Tier] = {}
        self._device_messages: collections.Counter[str] = collections.Counter()
        self._device_bytes: collections.Counter[str] = collections.Counter()
        self.messages = 0
        self.bytes = 0

    def __len__(self) -> int:
        return self.messages

    def push(self, device_id: str, kind: Kind, payload: bytes) -> str | None:
        """Queue a message; None when queued, else the reason it was refused."""
        size = len(payload)
        lim = self.limits
        if (
            self._device_messages[device_id] >= lim.device_messages
            or self._device_bytes[device_id] + size > lim.device_bytes
        ):
            return "device_queue_full"
        if self.messages >= lim.total_messages or self.bytes + size > lim.total_bytes:
            return "queue_full"
        priority = PRIORITY[kind]
        tier = self._tiers.get(priority)
        if tier is None:
            tier = self._tiers[priority] = _Tier()
            self._tiers = dict(sorted(self._tiers.items()))
        tier.push(Queued(device_id, kind, payload))
        self._device_messages[device_id] += 1
        self._device_bytes[device_id] += size
        self.messages += 1
        self.bytes += size
        return None

    def take(self, max_messages: int, max_bytes: int) -> list[Queued]:
        """Up to `max_messages` / `max_bytes` (at least one message when any is queued)."""
        out: list[Queued] = []
        taken_bytes = 0
        for tier in self._tiers.values():
            while tier.turn and len(out) < max_messages:
                head = tier.by_device[tier.turn[0]][0]
                if out and taken_bytes + len(head.payload) > max_bytes:
                    return self._forget(out)
                item = tier.pop_next()
                taken_bytes += len(item.payload)
                out.append(item)
        return self._forget(out)

    def _forget(self, taken: list[Queued]) -> list[Queued]:
        for item in taken:
            size = len(item.payload)
            self._device_messages[item.device_id] -= 1
            self._device_bytes[item.device_id] -= size
            if not self._device_messages[item.device_id]:
                del self._device_messages[item.device_id]
                del self._device_bytes[item.device_id]
            self.messages -= 1
            self.bytes -= size
        return taken

    @property
    def saturated(self) -> bool:
        """The global bound is reached: stop reading the socket (backpressure)."""
        lim = self.limits
        return self.messages >= lim.total_messages or self.bytes >= lim.total_bytes * 0.99

    @property
    def resumable(self) -> bool:
        lim = self.limits
        ratio = lim.resume_ratio
        return self.messages <= lim.total_messages * ratio and self.bytes <= lim.total_bytes * ratio

    def depth(self, device_id: str) -> int:
        return self._device_messages.get(device_id, 0)

    def devices(self) -> int:
        return len(self._device_messages)
