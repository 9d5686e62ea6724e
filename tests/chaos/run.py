"""One chaos run: `python -m tests.chaos.run [--seconds S] [--seed N] [--no-clock]`.

Starts the rig, the watches and the load, plays the schedule (checking the store's
invariants every `CHECK_EVERY_S` while it goes), stops the load, waits for the agents'
outboxes to drain, checks everything once more and prints the table. Exit 1 on any
violation, 2 when this machine cannot run it (the reason is printed). The seed is printed
first: `DGDM_CHAOS_SEED` / `--seed` replays a schedule, `DGDM_CHAOS_S` / `--seconds` sets
the length, `DGDM_CHAOS_CLOCK=0` / `--no-clock` leaves the clock fault out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import faults
from .invariants import (
    Injected,
    Violation,
    alerts_first,
    commands_once,
    crashes,
    jobs_done,
    quiet_reconnect,
    recoveries,
    results_exactly_once,
    seqs_unique,
    server_errors,
)
from .load import CommandLoad, JobLoad
from .observe import DuplicateCounter, ExitWatch, HealthWatch, StoreRows
from .report import Figures, table
from .rig import TOKEN, Rig, Unavailable, http_get
from .schedule import CLOCK_AGENT, KINDS, Fault, make_schedule

CHECK_EVERY_S = 10.0
DRAIN_S = 120.0
STUCK_S = 30.0  # longer than the agents' receipt_timeout_s (10) and a reconnect
RESULTS_PER_S = 3.0  # per agent


@dataclass
class Outcome:
    table: str
    violations: list[Violation]


def settings_from_env() -> tuple[float, int, bool]:
    seconds = float(os.environ.get("DGDM_CHAOS_S", "180"))
    seed_text = os.environ.get("DGDM_CHAOS_SEED")
    seed = int(seed_text) if seed_text else random.SystemRandom().randrange(1, 10**6)
    clock = os.environ.get("DGDM_CHAOS_CLOCK", "1") != "0"
    return seconds, seed, clock


def run(seconds: float, seed: int, *, clock: bool = True, root: Path | None = None) -> Outcome:
    kinds = KINDS if clock else tuple(k for k in KINDS if k != "clock_step")
    schedule = make_schedule(seed, seconds, kinds)
    print(f"chaos: seed {seed}, {seconds:g} s, {len(schedule)} faults", flush=True)
    for fault in schedule:
        print(f"chaos:   {fault.describe()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="dgdm-chaos-") as tmp:
        rig = Rig(root or Path(tmp), clock=clock)
        try:
            return _run(rig, schedule, seconds, seed, clock)
        finally:
            rig.stop()


def _run(rig: Rig, schedule: list[Fault], seconds: float, seed: int, clock: bool) -> Outcome:
    rig.start()
    names = ["broker", "pg", *(p.name for p in rig.parts())]
    health = HealthWatch(rig, names).start()
    exits = ExitWatch(rig.parts()).start()
    store, duplicates = StoreRows(rig), DuplicateCounter(rig.coordinators)
    rig.start_loaders(RESULTS_PER_S)
    commands, jobs = CommandLoad(rig, seed).start(), JobLoad(rig, seed).start()
    figures = Figures(seed, seconds, clock, started=time.time())
    try:
        injected, found = _play(rig, schedule, seconds, store, duplicates)
    finally:
        commands.stop()
        jobs.stop()
        for agent in rig.agents:
            assert agent.loader is not None
            agent.loader.stop()
    figures.command_posts = commands.statuses
    figures.job_posts = jobs.statuses
    figures.drain_s = _drain(rig, store)
    duplicates.sample()
    health.stop()
    exits.stop()
    found += _final_checks(rig, store, injected, figures, commands.refused)
    recovery, slow = recoveries(injected, health.samples)
    found += slow + crashes(exits.exits) + server_errors(_answers(rig, commands, jobs))
    for name, tail in exits.tails.items():
        print(f"chaos: last log of {name} before it exited:\n{tail}", flush=True)
    figures.duplicates = duplicates.total
    violations = list(dict.fromkeys(found))  # the continuous checks repeat themselves
    return Outcome(table(figures, injected, recovery, violations), violations)


def _play(
    rig: Rig, schedule: list[Fault], seconds: float, store: StoreRows, dups: DuplicateCounter
) -> tuple[list[Injected], list[Violation]]:
    """Each fault in a thread of its own (a slow action, PostgreSQL's recovery say, must not
    delay the next fault); the store is checked meanwhile."""
    injected: list[Injected] = []
    found: list[Violation] = []
    t0 = time.time()
    threads = [
        threading.Thread(target=_inject, args=(rig, f, t0, injected, found), daemon=True)
        for f in schedule
    ]
    for thread in threads:
        thread.start()
    next_check = t0 + CHECK_EVERY_S
    while time.time() < t0 + seconds or any(t.is_alive() for t in threads):
        if time.time() >= next_check:
            dups.sample()
            found += _store_checks(store, drained=False)
            next_check = time.time() + CHECK_EVERY_S
        time.sleep(0.2)
    return sorted(injected, key=lambda i: i.started), found


def _inject(
    rig: Rig, fault: Fault, t0: float, injected: list[Injected], found: list[Violation]
) -> None:
    time.sleep(max(0.0, t0 + fault.t - time.time()))
    started = time.time()
    for action, verb in ((faults.begin, "begin"), (faults.finish, "end  ")):
        if verb != "begin":
            time.sleep(max(0.0, t0 + fault.end - time.time()))
        try:
            action(rig, fault)
        except Exception as exc:  # a failed injector is reported; the run goes on
            found.append(Violation("injector_failed", f"{fault.describe()}: {exc!r}"))
        print(f"chaos: {time.time() - t0:7.1f}s {verb} {fault.describe()}", flush=True)
    injected.append(Injected(fault, started, time.time()))


def _store_checks(store: StoreRows, *, drained: bool, **windows: Any) -> list[Violation]:
    try:
        rows = store.messages()
        commands, replies = store.commands(), store.replies()
        results = store.results()
    except Exception:
        return []
    found = seqs_unique([(d, k, s) for d, k, s, _, _ in rows])
    found += commands_once(commands, replies, drained, **windows)
    found += results_exactly_once({}, results)
    return found


def _outbox_busy(rig: Rig) -> list[str]:
    """Agents with results, alerts or replies still queued (telemetry never stops)."""
    busy = []
    for agent in rig.agents:
        assert agent.part.url is not None
        try:
            status, body = http_get(agent.part.url + "/outbox", token=agent.token, timeout=5)
            kinds = json.loads(body)["kinds"]
        except (OSError, ValueError, KeyError):
            busy.append(agent.part.name)
            continue
        if status != 200 or any(kinds[k]["messages"] for k in ("result", "alert", "reply")):
            busy.append(agent.part.name)
    return busy


def _drain(rig: Rig, store: StoreRows) -> float:
    """Wait until no agent has results, alerts or replies queued and every command is
    replied, or until nothing changed for `STUCK_S` (a command that will never be replied
    is a violation to report, not a reason to wait out `DRAIN_S`)."""
    started = last_change = time.monotonic()
    seen: object = None
    while time.monotonic() - started < DRAIN_S:
        try:
            unreplied = sorted((c[0], c[1]) for c in store.commands() if not c[2])
            unreplied += [("job", j["id"]) for j in _jobs(rig) if j["state"] == "running"]
        except Exception:  # the store answers again soon
            unreplied = [("?", 0)]
        busy = _outbox_busy(rig)
        if unreplied != seen:
            seen, last_change = unreplied, time.monotonic()
        if not busy and (not unreplied or time.monotonic() - last_change > STUCK_S):
            break
        time.sleep(1.0)
    drain_s = time.monotonic() - started
    print(f"chaos: drained in {drain_s:.1f} s (still busy: {_outbox_busy(rig)})", flush=True)
    return drain_s


def _answers(rig: Rig, commands: CommandLoad, jobs: JobLoad) -> dict[str, dict[str, int]]:
    """Every load's answers by status: the loaders print theirs every 10 s (the last line
    counts all) and once more when stopped."""
    out = {"commands": dict(commands.statuses), "jobs": dict(jobs.statuses)}
    for agent in rig.agents:
        assert agent.loader is not None
        lines = agent.loader.log_tail(4000).strip().splitlines()
        with contextlib.suppress(IndexError, ValueError, KeyError):
            out[agent.loader.name] = json.loads(lines[-1])["statuses"]
    return out


def _jobs(rig: Rig) -> list[dict[str, Any]]:
    """Every job, from the first coordinator that answers (they answer from the store)."""
    for part in rig.coordinators:
        try:
            status, body = http_get(f"{part.url}/jobs?limit=1000", token=TOKEN, timeout=5)
        except OSError:
            continue
        if status == 200:
            return list(json.loads(body)["jobs"])
        if status == 404:  # a coordinator from before jobs: nothing to check
            return []
    raise RuntimeError("no coordinator answers GET /jobs")


def _accepted(rig: Rig) -> dict[str, list[tuple[int, str]]]:
    out: dict[str, list[tuple[int, str]]] = {}
    for agent in rig.agents:
        path = rig.root / f"accepted-a{agent.index}.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        out[agent.device_id] = [(int(r["seq"]), r["job_id"]) for r in map(json.loads, lines)]
    return out


def _final_checks(
    rig: Rig,
    store: StoreRows,
    injected: list[Injected],
    figures: Figures,
    refused: dict[str, list[tuple[int, int]]],
) -> list[Violation]:
    accepted = _accepted(rig)
    results = store.results()
    found = results_exactly_once(accepted, results)
    clock_device = rig.agents[CLOCK_AGENT].device_id
    steps = [
        (int(r.started * 1000) - 2000, int(r.ended * 1000) + 2000)
        for r in injected
        if r.fault.kind == "clock_step"
    ]
    found += _store_checks(
        store,
        drained=True,
        clock_steps={clock_device: steps},
        refused=refused,
        t0_ms=int(figures.started * 1000),
    )
    rows = store.messages()
    commands = store.commands()
    figures.accepted = sum(len(v) for v in accepted.values())
    stored_keys = {(d, s) for d, s, _ in results}
    figures.stored_results = sum(
        1 for d, items in accepted.items() for s, _ in items if (d, s) in stored_keys
    )
    figures.stored = Counter(k for _, k, _, _, _ in rows)
    figures.commands, figures.replied = len(commands), sum(1 for c in commands if c[2])
    all_jobs = _jobs(rig)
    figures.jobs = len(all_jobs)
    figures.jobs_completed = sum(1 for j in all_jobs if j["state"] == "completed")
    found += jobs_done(all_jobs, steps, int(figures.started * 1000))
    for rec in injected:
        if rec.fault.kind not in ("link_cut", "agent_kill"):
            continue
        agent = rec.fault.params.get("agent", 0)
        if not quiet_reconnect(injected, rec, agent):
            continue
        device = rig.agents[agent].device_id
        mine = [(k, c, r) for d, k, _, c, r in rows if d == device]
        checked, bad = alerts_first(mine, int(rec.ended * 1000), device)
        figures.alert_checks += checked
        found += bad
    return found


def main(argv: list[str] | None = None) -> int:
    seconds, seed, clock = settings_from_env()
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.run", description=__doc__)
    parser.add_argument("--seconds", type=float, default=seconds, help="run length (180)")
    parser.add_argument("--seed", type=int, default=seed, help="the schedule's seed")
    parser.add_argument("--no-clock", action="store_true", help="leave the clock fault out")
    parser.add_argument("--dir", type=Path, help="keep the logs, configs and data here")
    args = parser.parse_args(argv)
    if args.dir is not None:
        args.dir.mkdir(parents=True)
    # SIGTERM unwinds like Ctrl-C, so the rig stops its processes, namespace and tmpfs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        outcome = run(args.seconds, args.seed, clock=clock and not args.no_clock, root=args.dir)
    except Unavailable as exc:
        print(f"chaos: cannot run here: {exc}", file=sys.stderr)
        return 2
    print(outcome.table, flush=True)
    return 1 if outcome.violations else 0


if __name__ == "__main__":
    sys.exit(main())
