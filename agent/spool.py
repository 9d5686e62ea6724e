"""The spool directory: graph JSON files dropped there are diffused once, then moved to
done/ (with the answer when there is no outbox to send it) or failed/ (with the reason)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dgdm.agent.answers import http_answer
from dgdm.agent.errors import BadJson, QueueFull, ShuttingDown
from dgdm.agent.jsonio import dumps
from dgdm.kernels.errors import GraphError

if TYPE_CHECKING:
    from dgdm.agent.runtime import Agent

log = logging.getLogger("dgdm.agent")
SETTLE_S = 1.0


async def spool_loop(agent: Agent, spool: Path) -> None:
    for sub in ("done", "failed"):
        (spool / sub).mkdir(parents=True, exist_ok=True)
    while True:
        for path in await asyncio.to_thread(_spool_files, spool):
            if not await _spool_one(agent, path):
                break  # queue full or shutting down: try again on the next round
        await asyncio.sleep(agent.config.spool.poll_s)


async def _spool_one(agent: Agent, path: Path) -> bool:
    """Process one spool file; False if it must wait (queue full) and stays in place."""
    try:
        data = await asyncio.to_thread(path.read_bytes)
        result, _ = await agent.diffuse("spool", data, queue=agent.outbox is not None)
    except (QueueFull, ShuttingDown):
        return False
    except (GraphError, BadJson) as exc:
        await asyncio.to_thread(_move_failed, path, str(exc))
        agent.metrics.spool_files.labels("failed").inc()
        log.warning("spool file refused", extra={"file": path.name, "error": str(exc)})
        return True
    except OSError as exc:  # vanished or unreadable: skip, try again next round
        log.warning("spool file unreadable", extra={"file": path.name, "error": str(exc)})
        return True
    answer = None if agent.outbox is not None else dumps(http_answer(result, None))
    await asyncio.to_thread(_move_done, path, answer)
    agent.metrics.spool_files.labels("done").inc()
    return True


def _spool_files(spool: Path) -> list[Path]:
    """JSON files not touched for SETTLE_S (a writer may still be busy with newer ones)."""
    now = time.time()
    # abs(): after the wall clock stepped back, a file written before the step has an mtime
    # in the future; it is settled, not to be skipped until the clock catches up.
    files = [
        p for p in spool.glob("*.json") if p.is_file() and abs(now - p.stat().st_mtime) > SETTLE_S
    ]
    return sorted(files, key=lambda p: p.stat().st_mtime)


def _move_done(path: Path, answer: bytes | None) -> None:
    target = path.parent / "done" / path.name
    if answer is not None:
        target.with_suffix(".result.json").write_bytes(answer)
    path.replace(target)


def _move_failed(path: Path, reason: str) -> None:
    target = path.parent / "failed" / path.name
    target.with_suffix(".error.txt").write_text(reason + "\n", encoding="utf-8")
    path.replace(target)
