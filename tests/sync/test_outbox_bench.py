"""The durable enqueue benchmark `dgdm bench sync` calls."""

from __future__ import annotations

import pytest

from dgdm.sync.bench_outbox import bench_enqueue


def test_bench_enqueue_reports_grouped_and_single_commit_rates(tmp_path) -> None:
    result = bench_enqueue(tmp_path, n=512, producers=8)
    assert result["msg_s"] == result["async_msg_s"] > 0  # the agent's path
    assert result["grouped_msg_s"] > 0
    assert result["enqueue_many_msg_s"] > 0
    assert result["single_commit_msg_s"] > 0
    assert result["ratio"] == pytest.approx(result["msg_s"] / result["single_commit_msg_s"])
    assert 250 < result["payload_bytes"] < 400
    assert not list(tmp_path.glob("*.db*"))  # it cleans up after itself


@pytest.mark.bench
def test_grouped_commits_beat_one_commit_per_row(tmp_path) -> None:
    result = bench_enqueue(tmp_path, n=20_000, producers=32)
    print(result)
    assert result["ratio"] > 2
