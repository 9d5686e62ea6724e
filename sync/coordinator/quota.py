"""Per-device ingest quotas: token buckets checked on the topic's device id, before any
decryption or parsing (the broker's per-device ACL makes that id the publisher's own).

Pure: device, kind, size and time in, a decision out. Each device has a message bucket per
kind and one byte bucket for all kinds; a message over either is refused without a receipt
(an honest device sends it again later). State stays bounded whatever ids arrive: a bucket
that has refilled completely is the same as no bucket, so such buckets are forgotten when
the table grows, and the top-talkers table keeps only the heaviest refusers.
"""

from __future__ import annotations

import collections
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from dgdm.sync.envelope import Kind

MAX_BUCKETS = 65_536
MAX_TALKERS = 256
# What a device's own quota may set (`dgdm coordinator devices quota`), as in [ingest].
OVERRIDE_KEYS = ("result_per_s", "telemetry_per_s", "alert_per_s", "reply_per_s", "bytes_per_s")


def parse_override(text: str | None) -> dict[str, float]:
    """A stored override: JSON of OVERRIDE_KEYS to positive numbers; anything else in it is
    ignored (a row written by a newer release, or by hand), never an error at ingest."""
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(raw, dict):
        return {}
    return {
        k: float(v)
        for k, v in raw.items()
        if k in OVERRIDE_KEYS
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
        and v > 0
    }


@dataclass(frozen=True)
class Rate:
    per_s: float
    burst: float


@dataclass(frozen=True)
class QuotaPolicy:
    """Messages per second per kind (with a burst allowance) and bytes per second per device."""

    messages: Mapping[Kind, Rate]
    bytes: Rate
    alert_every_s: float = 300.0
    overrides: Mapping[str, QuotaPolicy] = field(default_factory=dict)

    def for_device(self, device_id: str) -> QuotaPolicy:
        return self.overrides.get(device_id, self)


@dataclass
class _Bucket:
    tokens: float
    at: float

    def take(self, rate: Rate, amount: float, now: float) -> bool:
        self.tokens = min(rate.burst, self.tokens + (now - self.at) * rate.per_s)
        self.at = now
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True

    def full(self, rate: Rate, now: float) -> bool:
        return self.tokens + (now - self.at) * rate.per_s >= rate.burst


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    # True once per device per `alert_every_s` while it is being refused: raise the
    # deduplicated `device_flooding` alert then.
    alert: bool = False


ADMIT = Verdict(True)
REFUSE = Verdict(False)
REFUSE_AND_ALERT = Verdict(False, alert=True)


class Quotas:
    def __init__(self, policy: QuotaPolicy) -> None:
        self.policy = policy
        self._messages: dict[tuple[str, Kind], _Bucket] = {}
        self._bytes: dict[str, _Bucket] = {}
        self._alerted: dict[str, float] = {}
        self.talkers: collections.Counter[str] = collections.Counter()

    def admit(self, device_id: str, kind: Kind, size: int, now: float) -> Verdict:
        policy = self.policy.for_device(device_id)
        rate = policy.messages.get(kind)
        if rate is None:
            return ADMIT
        if len(self._messages) >= MAX_BUCKETS:
            self._forget_full(now)
        key = (device_id, kind)
        bucket = self._messages.get(key)
        if bucket is None:
            bucket = self._messages[key] = _Bucket(rate.burst, now)
        byte_bucket = self._bytes.get(device_id)
        if byte_bucket is None:
            byte_bucket = self._bytes[device_id] = _Bucket(policy.bytes.burst, now)
        if bucket.take(rate, 1.0, now):
            if byte_bucket.take(policy.bytes, float(size), now):
                return ADMIT
            bucket.tokens += 1.0  # refused after all: the message token is not spent
        return self._refuse(device_id, now)

    def _refuse(self, device_id: str, now: float) -> Verdict:
        self.talkers[device_id] += 1
        if len(self.talkers) > MAX_TALKERS:
            for name, _ in self.talkers.most_common()[MAX_TALKERS // 2 :]:
                del self.talkers[name]
        last = self._alerted.get(device_id)
        if last is not None and now - last < self.policy.alert_every_s:
            return REFUSE
        if len(self._alerted) >= MAX_TALKERS:
            self._alerted = {
                d: t for d, t in self._alerted.items() if now - t < self.policy.alert_every_s
            }
        self._alerted[device_id] = now
        return REFUSE_AND_ALERT

    def _forget_full(self, now: float) -> None:
        """Forget buckets that have refilled; if that frees too little (many ids, all busy),
        forget the oldest quarter too: they come back full, a fresh burst and no more."""
        policy = self.policy
        self._messages = {
            key: b
            for key, b in self._messages.items()
            if not b.full(policy.for_device(key[0]).messages[key[1]], now)
        }
        self._bytes = {
            d: b for d, b in self._bytes.items() if not b.full(policy.for_device(d).bytes, now)
        }
        if len(self._messages) > MAX_BUCKETS * 3 // 4:
            keep = list(self._messages.items())[len(self._messages) - MAX_BUCKETS // 2 :]
            self._messages = dict(keep)
            self._bytes = {
                d: b
                for d, b in self._bytes.items()
                if (d, Kind.TELEMETRY) in self._messages
                or any((d, k) in self._messages for k in policy.messages)
            }

    def top_talkers(self, n: int = 10) -> list[tuple[str, int]]:
        """The devices refused most often (since start, bounded), heaviest first."""
        return self.talkers.most_common(n)

    def is_flooding(self, device_id: str, now: float) -> bool:
        """Refused within the last alert interval (what its device_flooding alert says)."""
        return now - self._alerted.get(device_id, float("-inf")) < self.policy.alert_every_s

    def flooding(self, now: float) -> list[str]:
        """Devices refused within the last alert interval."""
        every = self.policy.alert_every_s
        return sorted(d for d, t in self._alerted.items() if now - t < every)
