"""The chaos run under pytest (marker `chaos`, off by default): `tests/run -m chaos`.

DGDM_CHAOS_S sets the length (180 s), DGDM_CHAOS_SEED replays a schedule (the seed is
printed first), DGDM_CHAOS_CLOCK=0 leaves the clock fault out. Skips with the reason on a
machine that cannot run it (not root, no network namespaces, no PostgreSQL, no faketime).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.rig import Unavailable
from tests.chaos.run import DRAIN_S, run, settings_from_env

SECONDS, SEED, CLOCK = settings_from_env()
START_UP_S = 180  # the rig on a loaded machine, and its stop


@pytest.mark.chaos
@pytest.mark.timeout(SECONDS + DRAIN_S + START_UP_S)
def test_chaos_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    try:  # the logs, configs and data stay in tmp_path (pytest keeps the last three runs)
        outcome = run(SECONDS, SEED, clock=CLOCK, root=tmp_path)
    except Unavailable as exc:
        pytest.skip(f"the chaos rig cannot run here: {exc}")
    with capsys.disabled():
        print("\n" + outcome.table)
    assert not outcome.violations, outcome.table
