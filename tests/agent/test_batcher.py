"""Micro-batching on a real engine (numpy backend, a registered 34-node topology): fused
calls give each request what its own call gives; the window, the quiet-turn rule and the
width cap decide how many backend calls are made; a lone request does not wait out the
window; one batch's failure or a client going away touches nobody else."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dgdm.agent.batcher import Batcher, sets_of, side_by_side, split_columns
from dgdm.agent.config import load_config
from dgdm.kernels.engine import Engine
from dgdm.kernels.graph import parse_graph
from dgdm.sync.errors import ConfigError

KARATE = Path(__file__).resolve().parents[2] / "fixtures" / "karate.json"
KEY = ("club", "v1")


@pytest.fixture(scope="module")
def engine() -> Engine:
    engine = Engine(backend="numpy")
    engine.register(parse_graph({**json.loads(KARATE.read_text()), "graph_id": "club"}))
    return engine


class Runs:
    """The engine called in a worker thread, as the agent does; remembers each call's width."""

    def __init__(self, engine: Engine, fail: bool = False) -> None:
        self.engine = engine
        self.widths: list[int] = []
        self.fail = fail

    async def __call__(self, key: tuple[str, str], x: np.ndarray) -> Any:
        self.widths.append(x.shape[1])
        if self.fail:
            raise RuntimeError("backend fell over")
        return await asyncio.to_thread(self.engine.diffuse_registered, key[0], x)


def features(count: int, width: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((34, width), dtype=np.float32) for _ in range(count)]


def alone(engine: Engine, x: np.ndarray) -> np.ndarray:
    return np.asarray(engine.diffuse_registered("club", x).embedding)


async def test_concurrent_requests_share_one_call_and_get_their_own_columns(
    engine: Engine,
) -> None:
    runs = Runs(engine)
    batcher = Batcher(runs, window_s=0.05, max_width=1024)
    xs = features(8)
    answers = await asyncio.gather(*(batcher.diffuse(KEY, [x]) for x in xs))
    assert runs.widths == [24]
    for x, [(result, z)] in zip(xs, answers, strict=True):
        assert result.embedding.shape == (34, 24)
        np.testing.assert_allclose(z, alone(engine, x), rtol=1e-5, atol=1e-6)


async def test_window_zero_runs_every_request_on_its_own(engine: Engine) -> None:
    runs = Runs(engine)
    batcher = Batcher(runs, window_s=0.0, max_width=1024)
    xs = features(6)
    answers = await asyncio.gather(*(batcher.diffuse(KEY, [x]) for x in xs))
    assert runs.widths == [3] * 6
    for x, [(_, z)] in zip(xs, answers, strict=True):
        np.testing.assert_allclose(z, alone(engine, x), rtol=1e-5, atol=1e-6)
    # One request's own B feature sets still share a call, up to the width cap.
    runs.widths.clear()
    pieces = await Batcher(runs, window_s=0.0, max_width=7).diffuse(KEY, xs[:5])
    assert runs.widths == [6, 6, 3]
    for x, (_, z) in zip(xs[:5], pieces, strict=True):
        np.testing.assert_allclose(z, alone(engine, x), rtol=1e-5, atol=1e-6)


async def test_width_cap_starts_a_batch_early_and_keys_never_mix(engine: Engine) -> None:
    other = parse_graph({**json.loads(KARATE.read_text()), "graph_id": "club2"})
    engine.register(other)
    runs = Runs(engine)
    batcher = Batcher(runs, window_s=0.05, max_width=9)
    xs = features(5, seed=3)
    started = time.perf_counter()
    club = [batcher.diffuse(KEY, [x]) for x in xs]
    club2 = batcher.diffuse(("club2", "v1"), [xs[0]])
    answers = await asyncio.gather(*club, club2)
    assert sorted(runs.widths) == [3, 6, 9]  # 3 + 3 + 3 full, then 3 + 3; club2 alone
    assert time.perf_counter() - started < 1.0
    for x, [(_, z)] in zip(xs, answers[:5], strict=True):
        np.testing.assert_allclose(z, alone(engine, x), rtol=1e-5, atol=1e-6)


async def test_a_lone_request_does_not_wait_out_the_window(engine: Engine) -> None:
    x = features(1)[0]

    async def best_of(batcher: Batcher[Any, Any], tries: int = 30) -> float:
        best = float("inf")
        for _ in range(tries):
            started = time.perf_counter()
            await batcher.diffuse(KEY, [x])
            best = min(best, time.perf_counter() - started)
        return best

    bare = await best_of(Batcher(Runs(engine), window_s=0.0, max_width=1024))
    for window_s in (0.0002, 0.005):
        waited = await best_of(Batcher(Runs(engine), window_s=window_s, max_width=1024))
        # A few loop turns, not the window (a timer would sleep >= 1 ms even for 200 us).
        assert waited - bare < min(window_s, 0.0002), (waited, bare)


async def test_arrivals_over_several_turns_fuse_and_a_quiet_gap_splits(engine: Engine) -> None:
    runs = Runs(engine)
    batcher = Batcher(runs, window_s=0.5, max_width=1024)
    xs = features(4, seed=11)

    async def staggered(i: int) -> Any:
        for _ in range(i):  # one more loop turn per request: each arrives in its own turn
            await asyncio.sleep(0)
        return await batcher.diffuse(KEY, [xs[i]])

    answers = await asyncio.gather(*(staggered(i) for i in range(3)))
    assert runs.widths == [9]
    later = asyncio.create_task(batcher.diffuse(KEY, [xs[3]]))
    await asyncio.sleep(0.02)  # quiet turns: the batch above ran without waiting 0.5 s
    assert runs.widths == [9, 3]
    answers.append(await later)
    for x, [(_, z)] in zip(xs, answers, strict=True):
        np.testing.assert_allclose(z, alone(engine, x), rtol=1e-5, atol=1e-6)


async def test_a_steady_stream_is_cut_at_the_window(engine: Engine) -> None:
    runs = Runs(engine)
    window_s = 0.002
    batcher = Batcher(runs, window_s=window_s, max_width=1024)
    x = features(1)[0]
    tasks = []
    started = time.perf_counter()
    while time.perf_counter() - started < 10 * window_s:  # a new request every loop turn
        tasks.append(asyncio.create_task(batcher.diffuse(KEY, [x])))
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert sum(runs.widths) == 3 * len(tasks)
    assert len(runs.widths) >= 4  # ~10 windows' worth, each batch closed by its window


async def test_a_failed_call_fails_its_batch_only(engine: Engine) -> None:
    failing = Batcher(Runs(engine, fail=True), window_s=0.01, max_width=1024)
    outcomes = await asyncio.gather(
        *(failing.diffuse(KEY, [x]) for x in features(3)), return_exceptions=True
    )
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    runs = Runs(engine)
    working = Batcher(runs, window_s=0.01, max_width=1024)
    [(_, z)] = await working.diffuse(KEY, features(1)[:1])
    assert z.shape == (34, 3)


async def test_a_client_going_away_leaves_the_rest_of_its_batch(engine: Engine) -> None:
    runs = Runs(engine)
    batcher = Batcher(runs, window_s=0.02, max_width=1024)
    xs = features(3, seed=7)
    tasks = [asyncio.create_task(batcher.diffuse(KEY, [x])) for x in xs]
    await asyncio.sleep(0)
    tasks[1].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError)
    assert runs.widths == [9]
    for i in (0, 2):
        [(_, z)] = done[i]
        np.testing.assert_allclose(z, alone(engine, xs[i]), rtol=1e-5, atol=1e-6)


@given(widths=st.lists(st.integers(1, 5), min_size=1, max_size=8))
def test_split_columns_undoes_hstack(widths: list[int]) -> None:
    rng = np.random.default_rng(len(widths))
    parts = [rng.random((4, w)) for w in widths]
    for part, back in zip(parts, split_columns(np.hstack(parts), parts), strict=True):
        np.testing.assert_array_equal(part, back)


@given(
    b=st.integers(1, 9),
    f=st.integers(1, 5),
    max_width=st.integers(1, 20),
)
def test_side_by_side_and_back(b: int, f: int, max_width: int) -> None:
    sets = np.random.default_rng(b * f).random((b, 3, f))
    blocks = side_by_side(sets, max_width)
    assert all(block.shape[1] <= max(max_width, f) for block in blocks)
    np.testing.assert_array_equal(np.hstack(blocks), np.hstack(list(sets)))
    np.testing.assert_array_equal(sets_of(blocks, f), sets)


def test_batch_window_config() -> None:
    assert load_config(None, env={}).kernels.batch_window_us == 200
    assert (
        load_config(None, env={"DGDM__KERNELS__BATCH_WINDOW_US": "0"}).kernels.batch_window_us == 0
    )
    with pytest.raises(ConfigError, match=r"kernels\.batch_window_us"):
        load_config(None, env={"DGDM__KERNELS__BATCH_WINDOW_US": "-1"})
