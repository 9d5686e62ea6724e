"""At most one event per key per period, counting those held back (for log lines a client
or a peer can trigger as fast as it likes). Pure: the caller passes the time."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class RepeatLimiter:
    """At most one event per key per `period_s`. Pure: `allow(key, now)` is None to hold
    the event back, else how many of that key were held back since the last one let
    through. At most `max_keys` keys are remembered (the oldest forgotten first)."""

    def __init__(self, period_s: float = 60.0, max_keys: int = 256) -> None:
        self.period_s = period_s
        self.max_keys = max_keys
        self._keys: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()

    def allow(self, key: Hashable, now: float) -> int | None:
        last = self._keys.get(key)
        if last is not None and now - last[0] < self.period_s:
            self._keys[key] = (last[0], last[1] + 1)
            return None
        self._keys[key] = (now, 0)
        self._keys.move_to_end(key)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        return 0 if last is None else last[1]

    def __len__(self) -> int:
        return len(self._keys)
