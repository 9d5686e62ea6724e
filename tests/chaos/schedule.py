"""The fault schedule: pure, seed + run length -> a sorted list of faults.

Every kind appears at least once (when enabled and it fits), then more faults are drawn
until there is about one every 12 s. The first link cut ends in a quiet spell (no
broker, coordinator or store fault within 5 s before or 10 s after its end), so that
every run judges alert order after a reconnect at least once. Two faults on the same
target never overlap (one link, one clock, one process each); faults on different targets
may, as they would in the field.
Durations scale with the run length: a 30-minute run cuts the link for up to 120 s, a
3-minute run for up to 24 s (never shorter than the kind's minimum).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

KINDS = (
    "agent_kill",
    "broker_kill",
    "coordinator_kill",
    "coordinator_stop",
    "link_cut",
    "link_slow",
    "disk_full",
    "clock_step",
    "pg_restart",
)
AGENTS = 3
REPLICAS = 2
NETNS_AGENT = 0  # its link is cut and slowed
CLOCK_AGENT = 1  # runs under libfaketime
DISK_AGENT = 2  # its data dir is a small tmpfs
WARMUP_S = 10.0  # no fault before the load runs
SETTLE_S = 10.0  # every fault ends this long before the run does
FULL_SCALE_S = 900.0  # from this run length on, durations reach their full range
STOP_S = 20.0  # SIGSTOP of a coordinator, as the issue asks
EVERY_S = 12.0  # about one fault this often (each kind at least once)


@dataclass(frozen=True)
class Fault:
    t: float  # seconds from the start of the run
    kind: str
    duration: float
    target: str  # what it acts on: two faults on one target never overlap
    params: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def end(self) -> float:
        return self.t + self.duration

    def affects(self) -> tuple[str, ...]:
        """The parts whose /healthz must come back within 30 s after the fault ends."""
        if self.kind == "agent_kill":
            return (f"agent{self.params['agent']}",)
        if self.kind in ("coordinator_kill", "coordinator_stop"):
            return (f"coord{self.params['replica']}",)
        if self.kind == "broker_kill":
            return ("broker", *(f"coord{i}" for i in range(REPLICAS)))
        if self.kind == "pg_restart":
            return ("pg", *(f"coord{i}" for i in range(REPLICAS)))
        agent = {
            "link_cut": NETNS_AGENT,
            "link_slow": NETNS_AGENT,
            "disk_full": DISK_AGENT,
            "clock_step": CLOCK_AGENT,
        }[self.kind]
        return (f"agent{agent}",)

    def describe(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"t={self.t:7.1f}s  {self.kind:<17} {self.duration:5.1f}s  {extra}".rstrip()


def _scaled(rng: random.Random, low: float, high: float, scale: float) -> float:
    return round(rng.uniform(low, max(low * 2, high * scale)), 1)


def draw(rng: random.Random, kind: str, scale: float) -> tuple[float, str, dict[str, Any]]:
    """(duration, target, params) of one fault of `kind`."""
    if kind == "agent_kill":
        agent = rng.randrange(AGENTS)
        return round(rng.uniform(1, 5), 1), f"agent{agent}", {"agent": agent}
    if kind == "broker_kill":
        return round(rng.uniform(1, 8), 1), "broker", {}
    if kind in ("coordinator_kill", "coordinator_stop"):
        replica = rng.randrange(REPLICAS)
        duration = STOP_S if kind == "coordinator_stop" else round(rng.uniform(1, 10), 1)
        return duration, f"coord{replica}", {"replica": replica}
    if kind == "link_cut":
        return _scaled(rng, 5, 120, scale), "link", {}
    if kind == "link_slow":
        rate = rng.choice((32, 64, 128, 256))
        return _scaled(rng, 10, 60, scale), "link", {"rate_kbit": rate}
    if kind == "disk_full":
        return _scaled(rng, 5, 60, scale), "disk", {}
    if kind == "clock_step":
        return _scaled(rng, 10, 120, scale), "clock", {"offset_s": rng.choice((-3600, 3600))}
    if kind == "pg_restart":
        mode = rng.choice(("fast", "immediate"))
        return round(rng.uniform(0, 5), 1), "pg", {"mode": mode}
    raise ValueError(f"unknown fault kind {kind!r} (known: {', '.join(KINDS)})")


FAR_SIDE = ("broker_kill", "coordinator_kill", "coordinator_stop", "pg_restart")
QUIET_S = (5.0, 10.0)  # around the first link cut's end: no far-side fault


def _fits(faults: list[Fault], candidate: Fault) -> bool:
    return _quiet_kept([*faults, candidate]) and all(
        f.target != candidate.target or f.end + 1 < candidate.t or candidate.end + 1 < f.t
        for f in faults
    )


def _quiet_kept(faults: list[Fault]) -> bool:
    """The first link cut placed ends with no broker, coordinator or store fault within
    QUIET_S of its end, so that every run judges alert order after at least one reconnect
    (the far side reorders delivery; invariants.quiet_reconnect)."""
    cut = next((f for f in faults if f.kind == "link_cut"), None)
    if cut is None:
        return True
    before, after = QUIET_S
    return all(
        f.kind not in FAR_SIDE or f.t >= cut.end + after or f.end <= cut.end - before
        for f in faults
    )


def make_schedule(seed: int, seconds: float, kinds: tuple[str, ...] = KINDS) -> list[Fault]:
    rng = random.Random(seed)
    scale = min(1.0, seconds / FULL_SCALE_S)
    wanted = [*rng.sample(list(kinds), len(kinds))]
    extra = max(0, round(seconds / EVERY_S) - len(kinds))
    wanted += [rng.choice(kinds) for _ in range(extra)]
    faults: list[Fault] = []
    for kind in wanted:
        duration, target, params = draw(rng, kind, scale)
        latest = seconds - SETTLE_S - duration
        for _ in range(50):
            if latest < WARMUP_S:
                break
            candidate = Fault(
                math.floor(rng.uniform(WARMUP_S, latest) * 10) / 10, kind, duration, target, params
            )
            if _fits(faults, candidate):
                faults.append(candidate)
                break
    return sorted(faults, key=lambda f: (f.t, f.kind))
