"""The coordinator's HTTP API on a thread and event loop of its own.

Under a flood the ingest loop is busy from one socket read to the next (framing, routing and
quota checks for tens of thousands of messages a second), and every step of an HTTP request
on that loop would wait behind a read burst. On its own loop an API call waits only for the
interpreter's thread switch interval; its store reads already run on reader threads. What
must happen on the ingest loop (publishing a command over MQTT) hops there with
`Coordinator.on_main_loop`.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web

from dgdm.sync.coordinator.http import start_http
from dgdm.sync.listener import Listener


class ApiThread:
    def __init__(self, coordinator: Any) -> None:
        self._coordinator = coordinator
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._listener: Listener | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="coord-http")

    async def start(self) -> int:
        """Listen; returns the port. A bind failure raises here, as start_http's would."""
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(start_http(self._coordinator), self._loop)
        try:
            runner, listener, port = await asyncio.wrap_future(future)
        except BaseException:
            self._shutdown_loop()
            raise
        self._runner, self._listener = runner, listener
        return port

    async def stop(self) -> None:
        if self._listener is not None:
            self._loop.call_soon_threadsafe(self._listener.close)
            self._listener = None
        if self._runner is not None:
            future = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
            await asyncio.wrap_future(future)
            self._runner = None
        await asyncio.to_thread(self._shutdown_loop)

    def _shutdown_loop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()
