"""The command load: a thread that POSTs a command about once a second to a random device
on a random coordinator (ping, or diffuse of the karate graph, which also makes a result),
and one that creates a job (ping to all devices) every 20 s. What counts as sent is what
the coordinators stored in their commands table, not the 202s: a request that timed out
against a stopped coordinator may still have gone out."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter

from .loader import KARATE
from .rig import TOKEN, Rig, http_post

COMMAND_TTL_MS = 600_000  # outlives every fault of a 30-minute run
JOB_TIMEOUT_S = 300.0  # a job's device counts as timed out this long after its send


class CommandLoad:
    def __init__(self, rig: Rig, seed: int, per_s: float = 1.0) -> None:
        self.rig = rig
        self.rng = random.Random(seed)
        self.every_s = 1.0 / per_s
        self.statuses: Counter[str] = Counter()
        # device -> [(sent_ms, answered_ms)] of every POST not answered 202 (or timed out)
        self.refused: dict[str, list[tuple[int, int]]] = {}
        self._graph = json.loads(KARATE.read_text())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> CommandLoad:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            agent = self.rng.choice(self.rig.agents)
            coordinator = self.rng.choice(self.rig.coordinators)
            cmd = self.rng.choice(("ping", "diffuse"))
            body = {
                "cmd": cmd,
                "args": {"graph": self._graph} if cmd == "diffuse" else {},
                "ttl_ms": COMMAND_TTL_MS,
            }
            url = f"{coordinator.url}/devices/{agent.device_id}/commands"
            sent_ms = int(time.time() * 1000)
            try:
                status: object = http_post(url, body, TOKEN, timeout=5)[0]
            except OSError as exc:
                status = type(exc).__name__
            self.statuses[str(status)] += 1
            if isinstance(status, int) and status != 202:
                window = (sent_ms - 1000, int(time.time() * 1000) + 1000)
                self.refused.setdefault(agent.device_id, []).append(window)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class JobLoad:
    """A job (`POST /jobs`: ping to every device) every `every_s` on a random coordinator.
    Its timeout and TTL outlive every fault, and no failure ratio aborts it, so after the
    drain every job must be completed with every device succeeded."""

    def __init__(self, rig: Rig, seed: int, every_s: float = 20.0) -> None:
        self.rig = rig
        self.rng = random.Random(seed + 1)
        self.every_s = every_s
        self.statuses: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> JobLoad:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            coordinator = self.rng.choice(self.rig.coordinators)
            body = {
                "target": "all",
                "command": {"cmd": "ping", "args": {}},
                "timeout_s": JOB_TIMEOUT_S,
                "ttl_ms": COMMAND_TTL_MS,
                "max_failure_ratio": 1.0,
            }
            try:
                status: object = http_post(f"{coordinator.url}/jobs", body, TOKEN, timeout=5)[0]
            except OSError as exc:
                status = type(exc).__name__
            self.statuses[str(status)] += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
