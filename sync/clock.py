"""The device's estimate of the coordinator's clock (SPEC §6.1), free of I/O.

Edge boxes boot with a wrong wall clock until NTP answers, and NTP then steps it. So the
coordinator's clock is estimated against the device's *monotonic* clock, which never steps:
`coordinator ms ≈ monotonic ms + offset`. A wall-clock step on the device then changes
nothing here; the wall clock's own error (`skew_ms`, what `clock_skew` is raised on) is the
difference between this estimate and the wall clock at the moment it is asked.

Each receipt is a sample: the coordinator stamped its `created_ms` after it stored the
latest message the receipt covers, so that instant lies between that message's send
(`sent`) and the receipt's arrival (`received`). Taking the midpoint errs by at most half
the round trip; the sample with the smallest round trip within `window_s` of the newest one
wins (SPEC: "the smallest round trip winning"), so a slow receipt (a commit wait, a queue)
never drags the estimate. Old samples age out so the estimate follows the slow drift of a
crystal (tens of ppm) — but only relative to the newest sample: a device offline for a day
keeps its last estimate, which is far better than none.

Two samples whose error bounds (± half their round trips, plus `step_tolerance_ms` for
drift and for replicas whose clocks differ by a few ms) do not overlap cannot both be
right. So there is an estimate only once two samples agree (the first receipt after a
start may answer a copy the previous process sent long ago): until then a disagreeing
sample simply replaces the one before. After that, a lone contradicting sample is held
back as a suspect (a receipt for an earlier copy of a resent message looks like that); when
the next one agrees with the suspect rather than with the estimate, the coordinator's clock
stepped (or the traffic moved to a replica with another clock): the older samples are
dropped and the two new ones are the estimate.

Time is passed in: `sent` and `received` are monotonic seconds, `coordinator_ms` and
`wall_ms` are Unix milliseconds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

WINDOW_S = 300.0
STEP_TOLERANCE_MS = 100.0
MAX_SAMPLES = 256
# `clock_skew` clears once the skew is back below this fraction of `sync.max_clock_skew_ms`,
# so a skew hovering at the limit does not raise and clear it at every receipt.
CLEAR_FRACTION = 0.5


@dataclass(frozen=True)
class Sample:
    offset_ms: float  # coordinator ms minus monotonic ms at the round trip's midpoint
    rtt_ms: float
    at: float  # monotonic seconds when the receipt arrived

    def agrees_with(self, other: Sample, tolerance_ms: float) -> bool:
        bound = (self.rtt_ms + other.rtt_ms) / 2 + tolerance_ms
        return abs(self.offset_ms - other.offset_ms) <= bound


class ClockOffset:
    def __init__(
        self,
        window_s: float = WINDOW_S,
        step_tolerance_ms: float = STEP_TOLERANCE_MS,
        max_samples: int = MAX_SAMPLES,
    ) -> None:
        self.window_s = window_s
        self.step_tolerance_ms = step_tolerance_ms
        self._samples: deque[Sample] = deque(maxlen=max_samples)
        self._best: Sample | None = None
        self._suspect: Sample | None = None
        self._confirmed = False  # two samples agreed: there is an estimate
        self.steps = 0  # times the coordinator's clock was seen to step

    # -- samples -------------------------------------------------------------------------

    def observe(self, coordinator_ms: int, sent: float, received: float) -> bool:
        """One receipt: stamped `coordinator_ms` by the coordinator, answering a message sent
        at monotonic `sent` and arriving at `received`. False if it is unusable (it arrived
        before it was sent, or before the newest sample) or held back as a suspect."""
        newest = self._suspect or (self._samples[-1] if self._samples else None)
        if received < sent or (newest is not None and received < newest.at):
            return False
        rtt_ms = (received - sent) * 1000.0
        sample = Sample(coordinator_ms - (sent + received) * 500.0, rtt_ms, received)
        best = self._best
        if best is not None and not sample.agrees_with(best, self.step_tolerance_ms):
            if not self._confirmed:
                self._samples.clear()  # an unconfirmed sample is simply replaced
            elif not self._stepped(sample):
                return False
        elif best is not None:
            self._confirmed = True
            self._suspect = None
        self._samples.append(sample)
        while self._samples[0].at < received - self.window_s:
            self._samples.popleft()
        self._best = min(self._samples, key=lambda s: s.rtt_ms)
        return True

    def _stepped(self, sample: Sample) -> bool:
        """`sample` contradicts the estimate: a step if it agrees with the suspect before it
        (the older samples are dropped), else it is the suspect now."""
        suspect, self._suspect = self._suspect, sample
        if suspect is None or not sample.agrees_with(suspect, self.step_tolerance_ms):
            return False
        self._suspect = None
        self._samples.clear()
        self._samples.append(suspect)
        self.steps += 1
        return True

    @property
    def best(self) -> Sample | None:
        """The sample the estimate rests on, or None until two samples agreed."""
        return self._best if self._confirmed else None

    # -- estimates -----------------------------------------------------------------------

    def coordinator_ms(self, mono: float) -> int | None:
        """The coordinator's clock at monotonic `mono`, or None without an estimate."""
        best = self.best
        return None if best is None else round(mono * 1000.0 + best.offset_ms)

    def now_ms(self, wall_ms: int, mono: float) -> int:
        """Now on the coordinator's clock; the device's own clock until there is an
        estimate (SPEC §6.1). What command TTLs are judged against."""
        estimate = self.coordinator_ms(mono)
        return wall_ms if estimate is None else estimate

    def skew_ms(self, wall_ms: int, mono: float) -> int | None:
        """How far the device's wall clock is behind (+) or ahead (-) of the coordinator's."""
        estimate = self.coordinator_ms(mono)
        return None if estimate is None else estimate - wall_ms


def skew_alarm(active: bool, skew_ms: int | None, max_skew_ms: int) -> bool:
    """Whether `clock_skew` holds: raised above `max_skew_ms`, cleared only once back at
    or below CLEAR_FRACTION of it; unchanged without an estimate."""
    if skew_ms is None:
        return active
    if abs(skew_ms) > max_skew_ms:
        return True
    if abs(skew_ms) <= max_skew_ms * CLEAR_FRACTION:
        return False
    return active
