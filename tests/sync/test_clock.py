"""The coordinator-clock estimate (sync/clock.py): tables and properties, time passed in."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dgdm.sync.clock import CLEAR_FRACTION, ClockOffset, skew_alarm

HOUR_MS = 3_600_000


def _round_trip(clock: ClockOffset, true_offset_ms: float, sent: float, rtt_s: float, at: float):
    """A receipt stamped `at` seconds into a round trip of `rtt_s` starting at `sent`; the
    coordinator's clock reads monotonic + true_offset_ms."""
    coordinator_ms = round((sent + at) * 1000 + true_offset_ms)
    return clock.observe(coordinator_ms, sent, sent + rtt_s)


def test_without_two_agreeing_receipts_there_is_no_estimate_and_the_own_clock_rules() -> None:
    clock = ClockOffset()
    assert clock.coordinator_ms(5.0) is None
    assert clock.skew_ms(1_000, 5.0) is None
    assert clock.now_ms(1_000, 5.0) == 1_000
    _round_trip(clock, HOUR_MS, 1.0, 0.010, 0.005)  # an old copy's receipt, say
    assert clock.coordinator_ms(5.0) is None  # one alone is no estimate
    _round_trip(clock, 0.0, 2.0, 0.010, 0.005)  # disagrees: it replaces the first
    assert clock.coordinator_ms(5.0) is None
    _round_trip(clock, 0.0, 3.0, 0.010, 0.005)  # agrees: now there is one
    assert clock.coordinator_ms(5.0) == 5_000
    assert clock.steps == 0


@pytest.mark.parametrize(
    ("samples", "expected_offset_ms"),
    [
        # (sent s, rtt s, coordinator stamp s into the trip): the midpoint of the smallest wins
        ([(10.0, 0.010, 0.005), (11.0, 0.010, 0.005)], 0),
        ([(10.0, 2.0, 1.9), (13.0, 0.020, 0.010)], 0),  # the slow one's 900 ms error loses
        ([(10.0, 0.020, 0.010), (11.0, 2.0, 1.1)], 0),  # and still loses when it comes later
        ([(10.0, 1.0, 1.0), (12.0, 1.0, 1.0)], 500),  # it errs by at most half a round trip
        ([(10.0, 1.0, 0.0), (12.0, 1.0, 0.0)], -500),
    ],
)
def test_the_smallest_round_trip_wins(samples, expected_offset_ms) -> None:
    clock = ClockOffset()
    for sent, rtt, at in samples:
        assert _round_trip(clock, 0.0, sent, rtt, at)
    assert clock.coordinator_ms(100.0) == 100_000 + expected_offset_ms


@pytest.mark.parametrize("device_error_ms", [HOUR_MS, -HOUR_MS, 0, 4_000, -6_000])
def test_skew_is_the_wall_clocks_error_and_ttl_time_is_the_coordinators(device_error_ms) -> None:
    # Coordinator time = monotonic + 1.7e12 ms; the device's wall clock is off by the error.
    clock = ClockOffset()
    true_offset = 1.7e12
    _round_trip(clock, true_offset, 49.0, 0.004, 0.002)
    _round_trip(clock, true_offset, 50.0, 0.004, 0.002)
    mono = 60.0
    coordinator_now = round(mono * 1000 + true_offset)
    wall = coordinator_now + device_error_ms
    assert clock.skew_ms(wall, mono) == -device_error_ms
    assert clock.now_ms(wall, mono) == coordinator_now


def test_a_wall_clock_step_changes_no_estimate() -> None:
    clock = ClockOffset()
    _round_trip(clock, 1.7e12, 49.0, 0.004, 0.002)
    _round_trip(clock, 1.7e12, 50.0, 0.004, 0.002)
    before = clock.now_ms(1_700_000_060_000, 60.0)
    after = clock.now_ms(1_700_000_060_000 + HOUR_MS, 60.0)  # the wall clock stepped
    assert before == after


def test_a_lost_and_a_reversed_round_trip_are_refused() -> None:
    clock = ClockOffset()
    assert not clock.observe(1_000, sent=5.0, received=4.0)
    assert clock.best is None
    assert clock.observe(1_000, sent=5.0, received=5.1)
    assert not clock.observe(1_000, sent=4.0, received=5.0)  # older than the newest
    assert clock.best is None  # one sample alone


def test_old_samples_age_out_relative_to_the_newest_one_only() -> None:
    clock = ClockOffset(window_s=300.0)
    _round_trip(clock, 0.0, 0.0, 0.001, 0.0005)  # a fast one
    _round_trip(clock, 40.0, 100.0, 0.050, 0.025)  # slower, and the clock drifted 40 ms
    assert clock.best is not None
    assert clock.best.rtt_ms == pytest.approx(1.0)
    # A day offline: no newer sample, so the estimate stays (no estimate would be worse).
    assert clock.coordinator_ms(86_400.0) is not None
    _round_trip(clock, 45.0, 400.0, 0.050, 0.025)  # the fast one is now 400 s old
    assert clock.best is not None
    assert clock.best.rtt_ms == pytest.approx(50.0)
    assert clock.coordinator_ms(400.0) == pytest.approx(400_000 + 45, abs=1)


@pytest.mark.parametrize("step_ms", [HOUR_MS, -HOUR_MS, 1_000, -300])
def test_a_coordinator_clock_step_replaces_the_estimate_at_once(step_ms) -> None:
    clock = ClockOffset()
    _round_trip(clock, 0.0, 9.0, 0.001, 0.0005)
    _round_trip(clock, 0.0, 10.0, 0.001, 0.0005)
    assert not _round_trip(clock, step_ms, 20.0, 0.100, 0.050)  # one alone is a suspect
    assert clock.coordinator_ms(30.0) == pytest.approx(30_000, abs=1)
    assert _round_trip(clock, step_ms, 21.0, 0.100, 0.050)  # the next agrees with it: a step
    assert clock.steps == 1
    assert clock.coordinator_ms(30.0) == pytest.approx(30_000 + step_ms, abs=1)


def test_a_single_outlier_is_held_back_and_dropped() -> None:
    # A receipt for an earlier copy of a resent message: a short round trip, an old stamp.
    clock = ClockOffset()
    _round_trip(clock, 0.0, 9.0, 0.020, 0.010)
    _round_trip(clock, 0.0, 10.0, 0.020, 0.010)
    assert not clock.observe(12_000 - 5_000, sent=12.0, received=12.001)
    assert _round_trip(clock, 0.0, 13.0, 0.030, 0.015)  # back in line: the suspect is gone
    assert _round_trip(clock, 0.0, 14.0, 0.030, 0.015)
    assert clock.steps == 0
    assert clock.coordinator_ms(20.0) == pytest.approx(20_000, abs=10)


def test_replicas_a_few_ms_apart_are_no_step() -> None:
    clock = ClockOffset()
    for i in range(20):
        _round_trip(clock, 30.0 * (i % 2), 10.0 + i, 0.010, 0.005)
    assert clock.steps == 0


@given(
    true_offset=st.floats(-1e13, 1e13),
    trips=st.lists(
        st.tuples(
            st.floats(0.0, 5.0),  # gap before this send, s
            st.floats(0.0, 3.0),  # round trip, s
            st.floats(0.0, 1.0),  # where in the trip the coordinator stamped it
        ),
        min_size=2,
        max_size=30,
    ),
)
def test_the_estimate_errs_by_at_most_half_the_best_round_trip(true_offset, trips) -> None:
    clock = ClockOffset()
    t = 0.0
    for gap, rtt, where in trips:
        t += gap
        _round_trip(clock, true_offset, t, rtt, rtt * where)
        t += rtt
    best = clock.best
    assert best is not None
    assert clock.steps == 0
    assert best.rtt_ms == pytest.approx(min(r for _, r, _ in trips) * 1000, abs=1e-3)
    estimate = clock.coordinator_ms(t)
    assert estimate is not None
    assert abs(estimate - (t * 1000 + true_offset)) <= best.rtt_ms / 2 + 2  # ms rounding


@pytest.mark.parametrize(
    ("active", "skew_ms", "expected"),
    [
        (False, None, False),
        (True, None, True),  # no estimate: nothing changes
        (False, 5_000, False),
        (False, 5_001, True),
        (False, -5_001, True),
        (True, 4_000, True),  # between the clear level and the limit: holds
        (False, 4_000, False),
        (True, 2_500, False),
        (True, -2_500, False),
        (True, HOUR_MS, True),
    ],
)
def test_skew_alarm_has_hysteresis(active, skew_ms, expected) -> None:
    assert CLEAR_FRACTION == 0.5
    assert skew_alarm(active, skew_ms, 5_000) is expected


@given(st.lists(st.integers(-10 * HOUR_MS, 10 * HOUR_MS), max_size=50))
def test_skew_alarm_follows_the_limits(skews) -> None:
    active = False
    for skew in skews:
        active = skew_alarm(active, skew, 5_000)
        if abs(skew) > 5_000:
            assert active
        if abs(skew) <= 2_500:
            assert not active


def test_max_clock_skew_ms_defaults_to_spec_and_a_bad_one_names_the_key(tmp_path) -> None:
    from dgdm.agent.config import load_config
    from dgdm.sync.errors import ConfigError

    assert load_config(None, env={}).sync.max_clock_skew_ms == 5_000  # SPEC §6.1
    for bad in ("0", "-5", "soon"):
        with pytest.raises(ConfigError, match=r"sync\.max_clock_skew_ms"):
            load_config(None, env={"DGDM__SYNC__MAX_CLOCK_SKEW_MS": bad})
