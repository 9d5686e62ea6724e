"""The soak bench: its verdict as a table (default suite), and a real run behind the marker
`soak` (`pytest -m soak`; DGDM_SOAK_MIN sets the length, default 3 minutes)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pytest

from dgdm.sync.bench_soak import growth, run, slope_per_hour, verdict

CAP = 1_000_000


def _samples(**series: list[float]) -> list[dict[str, Any]]:
    n = len(next(iter(series.values())))
    rows = [{"t_s": 10.0 * i, "outbox_bytes": 4096} for i in range(n)]
    for key, values in series.items():
        for row, value in zip(rows, values, strict=True):
            row[key] = value
    return rows


@pytest.mark.parametrize(
    ("series", "problems"),
    [
        ({"agent_rss": [100, 100, 100, 101, 103, 104, 104, 105]}, []),  # +4 %: passes
        ({"agent_rss": [100, 100, 100, 100, 100, 106, 107, 107]}, ["agent_rss"]),  # +7 %
        # growth during the warm-up (the first two samples here) does not count
        ({"agent_rss": [50, 80, 100, 100, 100, 101, 101, 101]}, []),
        ({"coordinator_fds": [16, 16, 16, 16, 17, 17, 17, 17]}, []),  # +1 fd: a reconnect
        ({"coordinator_fds": [16, 16, 16, 16, 16, 18, 18, 18]}, ["coordinator_fds"]),
        ({"outbox_bytes": [4096] * 7 + [CAP * 1.06]}, ["outbox file"]),
        ({"outbox_bytes": [4096] * 7 + [CAP * 1.04]}, []),
    ],
)
def test_verdict(series: dict[str, list[float]], problems: list[str]) -> None:
    found = verdict(_samples(**series), warmup_s=20.0, outbox_cap=CAP)
    assert len(found) == len(problems)
    for text, word in zip(found, problems, strict=True):
        assert word in text


def test_slopes_are_per_hour_and_growth_compares_medians() -> None:
    samples = _samples(agent_rss=[1000 + 10 * i for i in range(10)])  # +10 per 10 s
    assert slope_per_hour(samples, "agent_rss") == pytest.approx(3600.0)
    assert slope_per_hour(samples, "missing") is None
    assert growth(samples, "agent_rss") == (1010, 1080)


@pytest.mark.soak
def test_soak(tmp_path: Path) -> None:
    minutes = float(os.environ.get("DGDM_SOAK_MIN", "3"))
    args = argparse.Namespace(
        minutes=minutes,
        warmup_minutes=None,
        results_per_s=2.0,
        broker_restart_s=min(120.0, minutes * 60 / 3),
        sample_s=10.0,
        outbox_cap=16 << 20,
    )
    report = run(tmp_path, args)
    print({k: v for k, v in report.items() if k != "samples"})
    assert report["broker_restarts"] >= 2
    assert report["ok"], report["problems"]
