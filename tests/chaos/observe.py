"""What the run watches while it goes: each part's /healthz (one thread per part, so a
stopped coordinator does not slow the others' samples), unexpected exits (restarted, and
recorded as crashes), the coordinators' duplicate counters, and the store's rows."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

from .rig import TOKEN, Part, Rig, http_get

HEALTH_EVERY_S = 0.5


class HealthWatch:
    def __init__(self, rig: Rig, names: list[str]) -> None:
        self.rig = rig
        self.samples: dict[str, list[tuple[float, bool]]] = {n: [] for n in names}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._watch, args=(n,), daemon=True) for n in names
        ]

    def start(self) -> HealthWatch:
        for thread in self._threads:
            thread.start()
        return self

    def _watch(self, name: str) -> None:
        while not self._stop.is_set():
            ok = False
            with contextlib.suppress(Exception):
                ok = self.rig.healthy(name)
            self.samples[name].append((time.time(), ok))
            self._stop.wait(HEALTH_EVERY_S)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)


class ExitWatch:
    """Restarts a part that exited by itself (after a second) and records the exit."""

    def __init__(self, parts: list[Part]) -> None:
        self.parts = parts
        self.exits: list[tuple[str, float, int]] = []
        self.tails: dict[str, str] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> ExitWatch:
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            for part in self.parts:
                with self._lock:
                    code = part.exited()
                    if code is None:
                        continue
                    self.exits.append((part.name, time.time(), code))
                    self.tails[part.name] = part.log_tail()
                    part.expected_down = True
                threading.Timer(1.0, self._restart, args=(part,)).start()

    def _restart(self, part: Part) -> None:
        with self._lock:
            if not self._stop.is_set():
                part.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class DuplicateCounter:
    """Sum of every coordinator's `dgdm_duplicates_total`, across their restarts (a counter
    that went down belongs to a new process: its old value is kept)."""

    def __init__(self, coordinators: list[Part]) -> None:
        self.coordinators = coordinators
        self.last: dict[str, float] = {}
        self.banked = 0.0

    def sample(self) -> None:
        for part in self.coordinators:
            assert part.url is not None
            try:
                status, body = http_get(part.url + "/metrics", timeout=2, token=TOKEN)
            except OSError:
                continue
            if status != 200:
                continue
            value = _metric(body.decode(), "dgdm_duplicates_total")
            previous = self.last.get(part.name, 0.0)
            if value < previous:
                self.banked += previous
            self.last[part.name] = value

    @property
    def total(self) -> int:
        return int(self.banked + sum(self.last.values()))


def _metric(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{")
    )


class StoreRows:
    """Reads the shared PostgreSQL store (as its superuser; the messages table's UNIQUE
    (device_id, kind, seq) already refuses a second row for one key)."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig

    def _query(self, sql: str) -> list[tuple[Any, ...]]:
        import psycopg

        pg = self.rig.pg
        with psycopg.connect(self.rig.store_url, password=pg.password, connect_timeout=5) as conn:
            return [tuple(r) for r in conn.execute(sql)]

    def messages(self) -> list[tuple[str, int, int, int, int]]:
        """(device, kind, seq, created_ms, received_ms) of every message."""
        return self._query(  # type: ignore[return-value]
            "SELECT device_id, kind, seq, created_ms, received_ms FROM messages"
        )

    def results(self) -> list[tuple[str, int, str]]:
        return self._query(  # type: ignore[return-value]
            "SELECT device_id, seq, body::jsonb->>'job_id' FROM messages WHERE kind = 1"
        )

    def replies(self) -> list[tuple[str, int]]:
        rows = self._query(
            "SELECT device_id, body::jsonb->>'cmd_seq' FROM messages WHERE kind = 17"
        )
        return [(d, int(s)) for d, s in rows if s is not None]

    def commands(self) -> list[tuple[str, int, bool, int]]:
        return self._query(  # type: ignore[return-value]
            "SELECT device_id, seq, reply IS NOT NULL, created_ms FROM commands"
        )
