"""The agent's serving processes (`http.processes` > 1, agent/serving.py), kept running.

Started once the agent listens; one that exits is started again after RESTART_S (doubling
to RESTART_MAX_S while they keep failing within a minute of starting). Each reads the
agent's socket for what it passes on and holds a pipe on its stdin (its end stops it);
its stdout brings the JSON lines it reports, replayed into the agent's tally. SIGHUP is
passed on; they are stopped (SIGTERM, then SIGKILL) at the agent's stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from pathlib import Path

from dgdm.agent.tally import AgentTally

log = logging.getLogger("dgdm.agent")
RESTART_S = 1.0
RESTART_MAX_S = 30.0
STABLE_S = 60.0
LINE_LIMIT = 8 * 2**20  # one report: MAX_RECORDS calls of ~40 bytes each


class ServingProcesses:
    def __init__(
        self, count: int, port: int, socket_path: str, config_path: Path | None, tally: AgentTally
    ) -> None:
        self.count = count
        argv = [sys.executable, "-m", "dgdm.agent.serving", "--port", str(port)]
        argv += ["--socket", socket_path]
        if config_path is not None:
            argv += ["--config", str(config_path)]
        self.argv = argv
        self.tally = tally
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._listening: set[int] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    @property
    def serving(self) -> int:
        """How many listen now."""
        return len(self._listening)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._keep(i)) for i in range(self.count)]

    def reload(self) -> None:
        for proc in self._procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGHUP)

    async def stop(self, timeout_s: float) -> None:
        self._stopping.set()
        procs = list(self._procs.values())
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        waits = [asyncio.create_task(proc.wait()) for proc in procs]
        if waits:
            _, late = await asyncio.wait(waits, timeout=timeout_s)
            for proc in procs:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            if late:
                await asyncio.wait(late, timeout=1.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _keep(self, index: int) -> None:
        delay = RESTART_S
        while not self._stopping.is_set():
            started = time.monotonic()
            rc = await self._run(index)
            if self._stopping.is_set():
                return
            delay = RESTART_S if time.monotonic() - started > STABLE_S else delay
            log.error("serving process exited: starting another", extra={"rc": rc, "in_s": delay})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(RESTART_MAX_S, delay * 2)

    async def _run(self, index: int) -> int:
        proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=LINE_LIMIT,
        )
        self._procs[index] = proc
        try:
            assert proc.stdout is not None
            while line := await _line(proc.stdout):
                self._take(index, line)
            return await proc.wait()
        finally:
            self._listening.discard(index)
            self._procs.pop(index, None)
            if proc.stdin is not None:
                proc.stdin.close()

    def _take(self, index: int, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        if message.get("event") == "listening":
            self._listening.add(index)
        elif message.get("event") == "tally":
            self.tally.replay(message)


async def _line(stream: asyncio.StreamReader) -> bytes:
    """The next line; b"" at the end. A line over the limit is skipped."""
    while True:
        try:
            return await stream.readline()
        except ValueError:  # LimitOverrunError, as readline raises it
            continue
