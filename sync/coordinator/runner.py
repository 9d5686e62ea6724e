"""`dgdm coordinator`: run the service until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

from dgdm.common import heap
from dgdm.sync import datalock
from dgdm.sync.coordinator.config import CoordinatorConfig
from dgdm.sync.coordinator.service import Coordinator
from dgdm.sync.coordinator.stores import parse_store_url

log = logging.getLogger(__name__)


async def serve(config: CoordinatorConfig) -> int:
    # Held while running, so `dgdm coordinator restore` is refused meanwhile (SQLite only).
    target = parse_store_url(config.store.url, config.coordinator.data_dir)
    if target.path is None:
        return await _serve(config)
    with datalock.hold_shared(datalock.beside(target.path), "the coordinator"):
        return await _serve(config)


async def _serve(config: CoordinatorConfig) -> int:
    coordinator = Coordinator(config)
    await coordinator.start()
    heap.freeze_after_start()
    log.info(
        "coordinator %s: broker %s, HTTP on %s:%s",
        config.coordinator.id,
        config.mqtt.broker_url,
        config.http.bind,
        coordinator.http_port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await coordinator.stop()
    return 0
