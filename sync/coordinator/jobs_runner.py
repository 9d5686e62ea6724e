"""Each coordinator replica's job runner: a task that ticks the store's jobs (jobs_store.py)
and publishes the commands its tick claimed, on the one command path (Coordinator
`publish_command`, as `send_command` uses).

The tick is one store transaction (on the writer thread for SQLite, its own thread for
PostgreSQL; backing off to 5 s while the store is down); the publishes follow its commit,
then `job_published` starts their reply timeouts. A claim this
replica could not publish (broker down, device removed) keeps its lease and is published
again, with the same seq, by whichever replica ticks after the lease ran out.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
from typing import TYPE_CHECKING

from dgdm.sync.coordinator.jobs import TARGET_STATES
from dgdm.sync.coordinator.jobs_store import Send, Tick
from dgdm.sync.coordinator.stores import StoreUnavailable
from dgdm.sync.errors import SyncError
from dgdm.sync.wallclock import now_ms

if TYPE_CHECKING:
    from dgdm.sync.coordinator.service import Coordinator

log = logging.getLogger(__name__)

TICK_S = 0.2
LEASE_MS = 10_000  # a killed replica's unpublished claims go to the others after this
MAX_SENDS_PER_TICK = 200
BACKOFF_MAX_S = 5.0


class JobRunner:
    def __init__(
        self,
        coordinator: Coordinator,
        *,
        tick_s: float = TICK_S,
        lease_ms: int = LEASE_MS,
        max_sends: int = MAX_SENDS_PER_TICK,
    ) -> None:
        self.coordinator = coordinator
        # Unique per process: a restarted replica with the same id must not take over
        # the claims of its previous life (they expire and are published again instead).
        self.owner = f"{coordinator.config.coordinator.id}/{secrets.token_hex(4)}"
        self.tick_s = tick_s
        self.lease_ms = lease_ms
        self.max_sends = max_sends

    async def run_forever(self) -> None:
        pause = self.tick_s
        while True:
            try:
                await self.tick()
            except (StoreUnavailable, sqlite3.Error) as exc:
                log.debug("job tick skipped: %s", exc)
                pause = min(BACKOFF_MAX_S, pause * 2)  # a store that is down is not hammered
            except Exception:
                log.exception("job tick failed")
                pause = min(BACKOFF_MAX_S, pause * 2)
            else:
                pause = self.tick_s
            await asyncio.sleep(pause)

    async def tick(self) -> Tick:
        coordinator = self.coordinator
        store = coordinator.store
        result: Tick = await coordinator.run_for_jobs(
            store.job_tick, now_ms(), self.owner, self.lease_ms, self.max_sends
        )
        published = [s for s in result.sends if await self._publish(s)]
        if published:
            await coordinator.run_for_jobs(store.job_published, self.owner, published, now_ms())
        self._count(result)
        return result

    async def _publish(self, send: Send) -> bool:
        try:
            await self.coordinator.publish_command(
                send.device_id, send.seq, send.created_ms, send.body
            )
        except SyncError as exc:  # TransportError, UnknownDevice: the lease brings it back
            log.info("job %s: command to %s not published (%s)", send.job_id, send.device_id, exc)
            return False
        return True

    def _count(self, result: Tick) -> None:
        metrics = self.coordinator.metrics
        for job_id in result.aborted:
            metrics.jobs_aborted.inc()
            log.warning(
                "job %s aborted by its failure gate", job_id, extra={"alert": "job_aborted"}
            )
        metrics.jobs_active.set(result.active_jobs)
        for state in TARGET_STATES:
            metrics.job_targets.labels(state=state).set(result.active_targets.get(state, 0))
