"""The deadline of the diffusion running in this thread, checked by the long kernel loops.

A caller (the agent's worker) wraps a diffusion in `applied(Deadline(...))`; the iterative
exact PPR solve and every Horner loop call `check()` between products with T, so a request
over its deadline stops within one product instead of running on unobserved. `stop()`
(or `stop_by`) ends it early from another thread: the agent shutting down, the request
gone. Kernels stay free of asyncio:
this is a monotonic time and a flag.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from dgdm.kernels.errors import DeadlineExceeded


class Deadline:
    """A point in monotonic time, moved earlier (with its reason) when stopped."""

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self.at = clock() + seconds
        self.reason: str | None = None  # why it was moved earlier, if it was

    def remaining(self) -> float:
        return self.at - self._clock()

    def stop_by(self, at: float, reason: str) -> None:
        """End the diffusion at its first check from monotonic time `at` (any thread)."""
        if at < self.at:
            self.at = at
            self.reason = reason

    def stop(self, reason: str) -> None:
        """End the diffusion at its next check (any thread)."""
        self.stop_by(-math.inf, reason)

    def check(self) -> None:
        if self._clock() >= self.at:
            raise DeadlineExceeded(
                self.reason
                or f"the diffusion passed its deadline of {self.seconds:g} s and was stopped"
            )


_current: ContextVar[Deadline | None] = ContextVar("dgdm_deadline", default=None)


def check() -> None:
    """Raise DeadlineExceeded when this thread's diffusion is over its deadline."""
    deadline = _current.get()
    if deadline is not None:
        deadline.check()


@contextlib.contextmanager
def applied(deadline: Deadline | None) -> Iterator[None]:
    token = _current.set(deadline)
    try:
        yield
    finally:
        _current.reset(token)
