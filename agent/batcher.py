"""Micro-batching of diffusions on one operator (`kernels.batch_window_us`, SPEC §4.1).

Feature sets for the same key (graph id + operator version) that arrive within the window
are fused into one backend call on `[X1 | X2 | ...]`: the operator acts on every feature
column alone, so the columns split back are what separate calls would give, while the
call's fixed costs (thread hop, lock, int8 quantise/invoke) are paid once. The first set of
a batch opens the window; the batch runs when it closes or as soon as the next set would
take it past `max_width` columns (the engine's `kernels.max_features`). A window of 0 runs
each request on its own (its own B feature sets still share one call).

A batch also closes early, once the loop has run `QUIET_TURNS` turns in which nobody
joined it: each turn polls the sockets, so a quiet turn means no request is on its way
right now, and waiting out the window would only add latency (a closed-loop client, e.g.
wrk with 32 connections, sends nothing new until it is answered). A lone request thus waits
a few loop turns (microseconds), a burst is fused whole, and a steady stream is cut into
batches of at most the window. Timers are not used: the selector sleeps in whole
milliseconds, five times a 200 us window.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import numpy as np

# Loop turns without a new member after which a batch runs before its window is over: a
# request read in one turn reaches the batcher in the next, so one quiet turn can be a
# request in transit; two are not.
QUIET_TURNS = 2


class HasEmbedding(Protocol):
    @property
    def embedding(self) -> np.ndarray: ...


K = TypeVar("K", bound=Hashable)
R = TypeVar("R", bound=HasEmbedding)


@dataclass
class _Batch(Generic[R]):
    deadline: float
    parts: list[np.ndarray] = field(default_factory=list)
    waiters: list[asyncio.Future[tuple[R, np.ndarray]]] = field(default_factory=list)
    width: int = 0


class Batcher(Generic[K, R]):
    """`run(key, x)` diffuses an (N, F) float32 array; `diffuse` is what callers await."""

    def __init__(
        self, run: Callable[[K, np.ndarray], Awaitable[R]], window_s: float, max_width: int
    ) -> None:
        self._run = run
        self.window_s = window_s
        self.max_width = max_width
        self.calls = 0  # backend calls made, for tests and benchmarks
        self._open: dict[K, _Batch[R]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def diffuse(self, key: K, parts: Sequence[np.ndarray]) -> list[tuple[R, np.ndarray]]:
        """Diffuse each (N, F_i) part; answers in order, each with its own columns."""
        if self.window_s <= 0:
            out: list[tuple[R, np.ndarray]] = []
            for chunk in _chunks(parts, self.max_width):
                out += await self._call(key, chunk)
            return out
        loop = asyncio.get_running_loop()
        if len(parts) == 1:  # the usual request: one future, no gather around it
            return [await self._join(loop, key, parts[0])]
        return list(await asyncio.gather(*(self._join(loop, key, part) for part in parts)))

    def _join(
        self, loop: asyncio.AbstractEventLoop, key: K, part: np.ndarray
    ) -> asyncio.Future[tuple[R, np.ndarray]]:
        batch = self._open.get(key)
        if batch is not None and batch.width + part.shape[1] > self.max_width:
            self._start(key)
            batch = None
        if batch is None:
            batch = _Batch(loop.time() + self.window_s)
            self._open[key] = batch
            loop.call_soon(self._wake, loop, key, batch, 0, 0)
        waiter: asyncio.Future[tuple[R, np.ndarray]] = loop.create_future()
        batch.parts.append(part)
        batch.waiters.append(waiter)
        batch.width += part.shape[1]
        return waiter

    def _wake(
        self, loop: asyncio.AbstractEventLoop, key: K, batch: _Batch[R], seen: int, quiet: int
    ) -> None:
        if self._open.get(key) is not batch:
            return  # already started because it was full
        quiet = quiet + 1 if len(batch.parts) == seen else 0
        if quiet >= QUIET_TURNS or loop.time() >= batch.deadline:
            self._start(key)
        else:
            loop.call_soon(self._wake, loop, key, batch, len(batch.parts), quiet)

    def _start(self, key: K) -> None:
        batch = self._open.pop(key)
        task = asyncio.get_running_loop().create_task(self._settle(key, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, key: K, batch: _Batch[R]) -> None:
        """Run one fused call and hand every waiter its columns (or the call's error)."""
        try:
            pieces = await self._call(key, batch.parts)
        except asyncio.CancelledError:
            for waiter in batch.waiters:
                waiter.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - every waiter gets the call's own error
            for waiter in batch.waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        for waiter, piece in zip(batch.waiters, pieces, strict=True):
            if not waiter.done():  # a waiter whose client went away is cancelled
                waiter.set_result(piece)

    async def _call(self, key: K, parts: Sequence[np.ndarray]) -> list[tuple[R, np.ndarray]]:
        x = parts[0] if len(parts) == 1 else np.hstack(parts)
        self.calls += 1
        result = await self._run(key, x)
        return [(result, z) for z in split_columns(result.embedding, parts)]


def split_columns(z: np.ndarray, parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    """`z` of `[X1 | X2 | ...]` cut back into one block of columns per part."""
    if len(parts) == 1:
        return [z]
    bounds = itertools.accumulate((p.shape[1] for p in parts), initial=0)
    return [z[:, a:b] for a, b in itertools.pairwise(bounds)]


def side_by_side(sets: np.ndarray, max_width: int) -> list[np.ndarray]:
    """B feature sets (B, N, F) as few (N, k * F) blocks as fit `max_width` columns: set b
    is columns b * F .. (b + 1) * F of its block. One copy, not B slices stacked."""
    b, n, f = sets.shape
    if b == 1:
        return [sets[0]]
    per_block = max(1, max_width // f)
    return [
        np.ascontiguousarray(sets[i : i + per_block].transpose(1, 0, 2)).reshape(n, -1)
        for i in range(0, b, per_block)
    ]


def sets_of(blocks: Sequence[np.ndarray], f: int) -> np.ndarray:
    """`side_by_side` undone: (N, k * F) blocks back to (B, N, F)."""
    n = blocks[0].shape[0]
    if len(blocks) == 1 and blocks[0].shape[1] == f:
        return blocks[0][None]
    return np.concatenate([z.reshape(n, -1, f).transpose(1, 0, 2) for z in blocks])


def _chunks(parts: Sequence[np.ndarray], max_width: int) -> list[list[np.ndarray]]:
    """Consecutive parts grouped into calls of at most `max_width` columns (a wider part
    goes alone)."""
    chunks: list[list[np.ndarray]] = []
    width = 0
    for part in parts:
        if not chunks or width + part.shape[1] > max_width:
            chunks.append([])
            width = 0
        chunks[-1].append(part)
        width += part.shape[1]
    return chunks
