"""The latency anomaly detector (agent/anomaly.py): tables of series and their decisions,
and properties over random series (hypothesis)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dgdm.agent.anomaly import (
    CLEAR_AFTER,
    MIN_SAMPLES,
    RAISE_AFTER,
    Decision,
    LatencyDetector,
    Params,
)

MS = 0.001


def feed(detector: LatencyDetector, series: list[float], key: str = "g") -> list[Decision | None]:
    return [detector.observe(key, s, float(i)) for i, s in enumerate(series)]


def events(decisions: list[Decision | None]) -> list[tuple[int, Decision]]:
    return [(i, d) for i, d in enumerate(decisions) if d is not None]


def noisy(n: int, mean_s: float, jitter: float, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [mean_s * (1.0 + rng.uniform(-jitter, jitter)) for _ in range(n)]


W = MIN_SAMPLES + 20  # a warmed-up baseline

# (name, series, expected events as (index, decision))
TABLE = [
    ("flat series", [10 * MS] * 200, []),
    (
        "step x3 raises after RAISE_AFTER",
        [10 * MS] * W + [30 * MS] * 20,
        [(W + RAISE_AFTER - 1, Decision.RAISE)],
    ),
    (
        "step x3 then recovery clears after CLEAR_AFTER",
        [10 * MS] * W + [30 * MS] * 20 + [10 * MS] * 20,
        [(W + RAISE_AFTER - 1, Decision.RAISE), (W + 20 + CLEAR_AFTER - 1, Decision.CLEAR)],
    ),
    (
        "short spikes (RAISE_AFTER - 1) never raise",
        ([10 * MS] * 20 + [50 * MS] * (RAISE_AFTER - 1)) * 10,
        [],
    ),
    (
        "nothing judged during warm-up",
        [10 * MS] * (MIN_SAMPLES - RAISE_AFTER) + [100 * MS] * RAISE_AFTER,
        [],
    ),
    ("faster is not an anomaly", [10 * MS] * W + [1 * MS] * 50, []),
    ("0.1 ms jitter on a 0.2 ms kernel", [0.2 * MS] * W + [0.3 * MS, 0.2 * MS] * 50, []),
    ("x1.8 is under the relative floor", [10 * MS] * W + [18 * MS] * 50, []),
    (
        "a spike inside an anomaly restarts the clear count",
        [10 * MS] * W
        + [30 * MS] * RAISE_AFTER
        + ([10 * MS] * (CLEAR_AFTER - 1) + [30 * MS]) * 3
        + [10 * MS] * CLEAR_AFTER,
        [
            (W + RAISE_AFTER - 1, Decision.RAISE),
            (W + RAISE_AFTER + 3 * CLEAR_AFTER + CLEAR_AFTER - 1, Decision.CLEAR),
        ],
    ),
    ("NaN and negative samples are ignored", [10 * MS] * W + [float("nan"), -1.0] * 10, []),
]


@pytest.mark.parametrize(("name", "series", "expected"), TABLE, ids=[t[0] for t in TABLE])
def test_table(name: str, series: list[float], expected: list[tuple[int, Decision]]) -> None:
    assert events(feed(LatencyDetector(), series)) == expected


def test_anomalous_samples_stay_out_of_the_baseline() -> None:
    detector = LatencyDetector()
    feed(detector, [10 * MS] * W + [30 * MS] * 500)
    state = detector.baseline("g")
    assert state is not None
    assert state.raised
    assert state.mean_s == pytest.approx(10 * MS)
    assert state.last_s == 30 * MS


def test_keys_are_independent_and_bounded() -> None:
    detector = LatencyDetector(Params(max_keys=3))
    for key in ("a", "b"):
        feed(detector, [10 * MS] * W, key)
    assert [detector.observe("a", 40 * MS, 0.0) for _ in range(RAISE_AFTER)][-1] is Decision.RAISE
    assert not detector.raised("b")
    for key in ("c", "d"):
        detector.observe(key, MS, 0.0)
    assert len(detector) == 3
    assert detector.baseline("b") is None  # the least recently used went
    assert detector.raised("a")


@settings(max_examples=60, deadline=None)
@given(
    mean_ms=st.floats(0.05, 500.0),
    jitter=st.floats(0.0, 0.4),
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(MIN_SAMPLES, 600),
)
def test_stationary_noise_never_fires(mean_ms: float, jitter: float, seed: int, n: int) -> None:
    """Uniform noise of up to +-40 % around any mean never raises (it stays under the
    relative floor, whatever the deviation estimate does)."""
    assert events(feed(LatencyDetector(), noisy(n, mean_ms * MS, jitter, seed))) == []


@settings(max_examples=60, deadline=None)
@given(
    mean_ms=st.floats(0.2, 500.0),
    jitter=st.floats(0.0, 0.2),
    factor=st.floats(3.0, 50.0),
    seed=st.integers(0, 2**32 - 1),
    slow=st.integers(RAISE_AFTER, 200),
)
def test_step_fires_within_raise_after_and_recovery_clears(
    mean_ms: float, jitter: float, factor: float, seed: int, slow: int
) -> None:
    base = noisy(W, mean_ms * MS, jitter, seed)
    step = noisy(slow, factor * mean_ms * MS, jitter, seed + 1)
    back = noisy(CLEAR_AFTER + 5, mean_ms * MS, jitter, seed + 2)
    found = events(feed(LatencyDetector(), base + step + back))
    assert found == [
        (W + RAISE_AFTER - 1, Decision.RAISE),
        (W + slow + CLEAR_AFTER - 1, Decision.CLEAR),
    ]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.0, 10.0), max_size=300))
def test_decisions_alternate(series: list[float]) -> None:
    """Whatever the series: RAISE and CLEAR alternate, starting with RAISE."""
    found = [d for _, d in events(feed(LatencyDetector(), series))]
    assert found == [Decision.RAISE, Decision.CLEAR] * (len(found) // 2) + [Decision.RAISE] * (
        len(found) % 2
    )
