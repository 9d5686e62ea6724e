"""The chaos schedule is a pure function of seed and length (default suite: fast)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.chaos.schedule import FAR_SIDE, KINDS, SETTLE_S, WARMUP_S, draw, make_schedule

seeds = st.integers(min_value=0, max_value=2**32)
lengths = st.floats(min_value=60, max_value=1800)


@given(seeds, lengths)
@settings(max_examples=30, deadline=None)
def test_same_seed_same_schedule_within_the_run(seed: int, seconds: float) -> None:
    faults = make_schedule(seed, seconds)
    assert faults == make_schedule(seed, seconds)
    assert faults == sorted(faults, key=lambda f: (f.t, f.kind))
    for fault in faults:
        assert fault.t >= WARMUP_S
        assert fault.end <= seconds - SETTLE_S + 1e-6


@given(seeds, lengths)
@settings(max_examples=30, deadline=None)
def test_one_target_never_has_two_faults_at_once(seed: int, seconds: float) -> None:
    faults = make_schedule(seed, seconds)
    for i, a in enumerate(faults):
        for b in faults[i + 1 :]:
            if a.target == b.target:
                assert a.end < b.t or b.end < a.t, (a, b)


@pytest.mark.parametrize("seed", range(20))
def test_a_three_minute_run_has_every_kind(seed: int) -> None:
    kinds = {f.kind for f in make_schedule(seed, 180)}
    assert kinds == set(KINDS)


def test_the_clock_fault_can_be_left_out() -> None:
    kinds = tuple(k for k in KINDS if k != "clock_step")
    assert all(f.kind != "clock_step" for s in range(20) for f in make_schedule(s, 180, kinds))


@pytest.mark.parametrize(
    ("seconds", "longest_cut"),
    [(180, 24.0), (1800, 120.0)],
)
def test_durations_scale_with_the_run(seconds: float, longest_cut: float) -> None:
    import random

    rng = random.Random(0)
    cuts = [draw(rng, "link_cut", min(1.0, seconds / 900))[0] for _ in range(500)]
    assert min(cuts) >= 5
    assert max(cuts) <= longest_cut
    assert max(cuts) > longest_cut * 0.9


def test_an_unknown_kind_is_named() -> None:
    import random

    with pytest.raises(ValueError, match="nope"):
        draw(random.Random(0), "nope", 1.0)


@given(seeds, lengths)
@settings(max_examples=30, deadline=None)
def test_the_first_link_cut_ends_in_a_quiet_spell(seed: int, seconds: float) -> None:
    faults = make_schedule(seed, seconds)
    cuts = [f for f in faults if f.kind == "link_cut"]
    if not cuts:
        return
    # the guarantee is for the first one placed, which need not be the earliest: one holds
    assert any(
        all(f.kind not in FAR_SIDE or f.t >= c.end + 10 or f.end <= c.end - 5 for f in faults)
        for c in cuts
    )
