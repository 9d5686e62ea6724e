"""The table at the end of a run: faults by kind with their longest recovery, the message
counts, and every violation by name."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .invariants import Injected, Violation
from .schedule import KINDS


@dataclass
class Figures:
    seed: int
    seconds: float
    clock: bool
    started: float = 0.0  # wall-clock time the load began
    accepted: int = 0
    stored_results: int = 0
    stored: Counter[int] = field(default_factory=Counter)  # kind -> rows
    duplicates: int = 0
    commands: int = 0
    replied: int = 0
    command_posts: Counter[str] = field(default_factory=Counter)
    jobs: int = 0
    jobs_completed: int = 0
    job_posts: Counter[str] = field(default_factory=Counter)
    alert_checks: int = 0
    drain_s: float = 0.0


KIND_NAMES = {1: "result", 2: "telemetry", 3: "alert", 17: "reply"}


def table(
    figures: Figures,
    injected: list[Injected],
    recovery: dict[str, float],
    violations: list[Violation],
) -> str:
    counts = Counter(i.fault.kind for i in injected)
    clock = "" if figures.clock else " (clock fault off)"
    lines = [
        f"== chaos run: seed {figures.seed}, {figures.seconds:g} s{clock}; "
        f"replay: DGDM_CHAOS_SEED={figures.seed} DGDM_CHAOS_S={figures.seconds:g}",
        f"{'fault':<18}{'injected':>9}{'max recovery s':>16}",
    ]
    for kind in KINDS:
        if counts[kind] or kind in recovery:
            worst = recovery.get(kind)
            lines.append(f"{kind:<18}{counts[kind]:>9}{'-' if worst is None else worst:>16}")
    lines += [
        f"results accepted (HTTP 200, queue=1)  {figures.accepted}",
        f"  of them stored exactly once         {figures.stored_results}",
        "rows stored by kind                   "
        + ", ".join(f"{KIND_NAMES.get(k, k)} {n}" for k, n in sorted(figures.stored.items())),
        f"duplicates suppressed (coordinators)  {figures.duplicates}",
        f"commands stored / replied             {figures.commands} / {figures.replied}"
        f"  (POST answers: {dict(sorted(figures.command_posts.items()))})",
        f"jobs created / completed              {figures.jobs} / {figures.jobs_completed}"
        f"  (POST answers: {dict(sorted(figures.job_posts.items()))})",
        f"reconnects judged for alert order     {figures.alert_checks}",
        f"drain after the run                   {figures.drain_s:.1f} s",
    ]
    if violations:
        lines.append(f"VIOLATIONS ({len(violations)}):")
        lines += [f"  {v}" for v in violations]
    else:
        lines.append("violations: none")
    return "\n".join(lines)
