"""The invariants of a chaos run, as pure checks over what the run recorded and what the
store holds. Each returns `Violation`s (empty: it held); the run calls them while it goes
(the store checks every few seconds) and once more after the drain.

- results: every result an agent accepted (HTTP 200 with `queue=1`) is stored exactly once,
  under the seq the agent answered, and no job is stored under a second seq;
- seqs: no device seq is used by two messages (one counter per device and direction);
- commands: no command is replied twice (executed at most once) and, after the drain,
  every command the coordinators stored has its reply; every job completed, every one of
  its devices succeeded;
- alerts first: after a reconnect, the device's backlog of alerts is stored before its
  backlog of telemetry (within `ORDER_TOLERANCE_MS`: two replicas commit independently);
- health: each part's /healthz is 200 again within `RECOVERY_LIMIT_S` of its fault's end;
- crashes: no process exits unless the harness stopped it, and none keeps exiting;
- server errors: no request of the load is answered with a 5xx but 503 and 507.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .schedule import FAR_SIDE, Fault

RECOVERY_LIMIT_S = 30.0
ORDER_TOLERANCE_MS = 1000
CRASH_LOOP = (3, 120.0)  # this many unexpected exits of one part within this many seconds
ALERT, TELEMETRY = 3, 2
SHOWN = 5  # examples named per violation


@dataclass(frozen=True)
class Violation:
    name: str
    detail: str

    def __str__(self) -> str:
        return f"{self.name}: {self.detail}"


@dataclass(frozen=True)
class Injected:
    """A fault as it happened: wall-clock seconds when its begin and finish took effect."""

    fault: Fault
    started: float
    ended: float


def _examples(items: Iterable[object]) -> str:
    items = list(items)
    more = f" (+{len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return ", ".join(map(str, items[:SHOWN])) + more


def results_exactly_once(
    accepted: dict[str, list[tuple[int, str]]], stored: list[tuple[str, int, str]]
) -> list[Violation]:
    """`accepted`: device -> [(outbox seq, job_id)]; `stored`: (device, seq, job_id) rows."""
    by_key = {(d, s): j for d, s, j in stored}
    jobs = Counter((d, j) for d, _, j in stored)
    lost, wrong = [], []
    for device, items in accepted.items():
        for seq, job in items:
            found = by_key.get((device, seq))
            if found is None:
                lost.append(f"{device}#{seq}")
            elif found != job:
                wrong.append(f"{device}#{seq} holds {found} not {job}")
    twice = [f"{d} job {j} x{n}" for (d, j), n in jobs.items() if n > 1]
    out = []
    if lost:
        out.append(Violation("result_lost", f"{len(lost)} accepted, not stored: {_examples(lost)}"))
    if wrong:
        out.append(Violation("result_mismatch", _examples(wrong)))
    if twice:
        out.append(Violation("result_stored_twice", f"{len(twice)} jobs: {_examples(twice)}"))
    return out


def seqs_unique(rows: list[tuple[str, int, int]]) -> list[Violation]:
    """`rows`: (device, kind, seq) of every stored message."""
    kinds: dict[tuple[str, int], set[int]] = defaultdict(set)
    for device, kind, seq in rows:
        kinds[(device, seq)].add(kind)
    reused = [f"{d}#{s} kinds {sorted(k)}" for (d, s), k in kinds.items() if len(k) > 1]
    return [Violation("seq_reused", _examples(reused))] if reused else []


Windows = dict[str, list[tuple[int, int]]]  # device -> [(from_ms, to_ms)]


def commands_once(
    commands: list[tuple[str, int, bool, int]],
    replies: list[tuple[str, int]],
    drained: bool,
    clock_steps: Windows | None = None,
    refused: Windows | None = None,
    t0_ms: int = 0,
) -> list[Violation]:
    """`commands`: (device, seq, has reply, created_ms) rows; `replies`: (device, cmd_seq)
    of every stored reply message. `drained`: the run is over, so every command must be
    replied. An unreplied command is named apart when it was made while its device's clock
    was stepped (`clock_steps`: the device judged its TTL by the wrong clock, SPEC §6.1) or
    while a POST for its device was answered with an error (`refused`: the caller was told
    it failed, yet the coordinator keeps it as pending)."""
    counts = Counter(replies)
    twice = [f"{d} cmd {s} x{n}" for (d, s), n in counts.items() if n > 1]
    out = []
    if twice:
        out.append(Violation("command_executed_twice", _examples(twice)))
    if not drained:
        return out
    buckets: dict[str, list[str]] = defaultdict(list)
    for device, seq, replied, created in commands:
        if replied:
            continue
        name = "command_not_replied"
        if any(a <= created <= b for a, b in (refused or {}).get(device, [])):
            name = "command_refused_yet_stored"
        elif any(a <= created <= b for a, b in (clock_steps or {}).get(device, [])):
            name = "command_not_replied_clock_step"
        buckets[name].append(f"{device} cmd {seq} @{(created - t0_ms) / 1000:.1f}s")
    for name, items in sorted(buckets.items()):
        out.append(Violation(name, f"{len(items)}: {_examples(items)}"))
    return out


def jobs_done(
    jobs: list[dict[str, Any]], clock_steps: list[tuple[int, int]], t0_ms: int = 0
) -> list[Violation]:
    """After the drain every job (ping to all, no failure gate, a timeout and TTL longer
    than any fault) is completed with every device succeeded. One created while a clock
    was stepped is named apart (its command is judged by the wrong clock, SPEC §6.1)."""
    buckets: dict[str, list[str]] = defaultdict(list)
    for job in jobs:
        counts = {k: n for k, n in job["counts"].items() if n and k != "succeeded"}
        if job["state"] == "completed" and not counts:
            continue
        stepped = any(a <= job["created_ms"] <= b for a, b in clock_steps)
        name = "job_not_done_clock_step" if stepped else "job_not_done"
        at = (job["created_ms"] - t0_ms) / 1000
        buckets[name].append(f"job {job['id']} @{at:.1f}s {job['state']} {counts}")
    return [Violation(n, f"{len(v)}: {_examples(v)}") for n, v in sorted(buckets.items())]


def alerts_first(
    rows: list[tuple[int, int, int]], reconnect_ms: int, device: str
) -> tuple[bool, list[Violation]]:
    """`rows`: (kind, created_ms, received_ms) of one device. The backlog is what it made
    before `reconnect_ms` and what was stored after; (checked, violations): not checked
    when the backlog lacks alerts or telemetry."""
    backlog = [(k, r) for k, c, r in rows if c < reconnect_ms <= r]
    alerts = [r for k, r in backlog if k == ALERT]
    telemetry = [r for k, r in backlog if k == TELEMETRY]
    if not alerts or not telemetry:
        return False, []
    late = max(alerts) - min(telemetry)
    if late <= ORDER_TOLERANCE_MS:
        return True, []
    detail = (
        f"{device} after the reconnect at {reconnect_ms}: {len(alerts)} backlog alerts, the "
        f"last stored {late} ms after the first of {len(telemetry)} backlog telemetry"
    )
    return True, [Violation("alert_after_telemetry", detail)]


def quiet_reconnect(injected: list[Injected], reconnect: Injected, agent: int) -> bool:
    """Whether ordering can be judged after this reconnect: no broker, coordinator or store
    fault around it (they delay or reorder delivery on the far side of the agent's send
    order; a slow link only stretches it), and the agent's clock honest in the backlog's
    time (its created_ms then mean something)."""
    end = reconnect.ended
    for other in injected:
        kind = other.fault.kind
        mine = f"agent{agent}" in other.fault.affects()
        if kind == "clock_step" and mine and other.started < end + 5 and other.ended > end - 300:
            return False
        if kind in FAR_SIDE and other.started < end + 5 and other.ended > end - 5:
            return False
    return True


def recoveries(
    injected: list[Injected], health: dict[str, list[tuple[float, bool]]]
) -> tuple[dict[str, float], list[Violation]]:
    """Per fault kind the longest time from a fault's end (or the end of the last fault
    overlapping it on the same part) until that part's /healthz answered 200."""
    worst: dict[str, float] = {}
    out = []
    for rec in injected:
        for part in rec.fault.affects():
            end = _chain_end(injected, rec, part)
            back = next((t for t, ok in health.get(part, []) if t >= end and ok), None)
            if back is None:
                out.append(Violation("health_not_back", f"{part} after {rec.fault.describe()}"))
                continue
            took = round(back - end, 1)
            worst[rec.fault.kind] = max(worst.get(rec.fault.kind, 0.0), took)
            if took > RECOVERY_LIMIT_S:
                detail = f"{part} took {took} s after {rec.fault.describe()}"
                out.append(Violation("health_slow", detail))
    return worst, out


def _chain_end(injected: list[Injected], rec: Injected, part: str) -> float:
    end = rec.ended
    changed = True
    while changed:
        changed = False
        for other in injected:
            if part in other.fault.affects() and other.started <= end < other.ended:
                end, changed = other.ended, True
    return end


def server_errors(answers: dict[str, dict[str, int]]) -> list[Violation]:
    """`answers`: who -> {HTTP status or error name: count} of the load's requests. A 5xx
    other than 503 (unavailable, say so and retry) and 507 (the agent's disk is full) is a
    traceback where a JSON error belongs."""
    bad = [
        f"{who}: {n} x {status}"
        for who, statuses in sorted(answers.items())
        for status, n in sorted(statuses.items())
        if status.isdigit() and int(status) >= 500 and int(status) not in (503, 507)
    ]
    return [Violation("http_5xx", _examples(bad))] if bad else []


def crashes(exits: list[tuple[str, float, int]]) -> list[Violation]:
    """`exits`: (part, wall time, exit code) of every exit the harness did not cause."""
    out = [Violation("unexpected_exit", f"{p} exited {rc} at {t:.1f}") for p, t, rc in exits]
    times: dict[str, list[float]] = defaultdict(list)
    for part, t, _ in exits:
        times[part].append(t)
    count, window = CRASH_LOOP
    for part, ts in times.items():
        ts.sort()
        if any(ts[i + count - 1] - ts[i] <= window for i in range(len(ts) - count + 1)):
            out.append(Violation("crash_loop", f"{part} exited {len(ts)} times"))
    return out
