"""Per-device token-bucket quotas: decisions as a function of device, kind, size and time."""

from __future__ import annotations

from dgdm.sync.coordinator import quota
from dgdm.sync.coordinator.quota import QuotaPolicy, Quotas, Rate
from dgdm.sync.envelope import Kind


def policy(**kw) -> QuotaPolicy:
    return QuotaPolicy(
        messages={Kind.TELEMETRY: Rate(10, 20), Kind.RESULT: Rate(100, 100)},
        bytes=Rate(1000, 5000),
        alert_every_s=60,
        **kw,
    )


def test_burst_then_rate() -> None:
    q = Quotas(policy())
    admitted = [q.admit("b", Kind.TELEMETRY, 10, 0.0).admitted for _ in range(25)]
    assert admitted.count(True) == 20
    assert q.admit("b", Kind.TELEMETRY, 10, 0.05).admitted is False
    assert q.admit("b", Kind.TELEMETRY, 10, 0.1).admitted is True  # one token after 0.1 s


def test_one_device_over_quota_leaves_others_and_other_kinds_alone() -> None:
    q = Quotas(policy())
    for _ in range(100):
        q.admit("b", Kind.TELEMETRY, 10, 0.0)
    assert q.admit("a", Kind.TELEMETRY, 10, 0.0).admitted
    assert q.admit("b", Kind.RESULT, 10, 0.0).admitted


def test_bytes_bucket_spans_kinds_and_refunds_the_message_token() -> None:
    q = Quotas(policy())
    assert q.admit("b", Kind.RESULT, 4000, 0.0).admitted
    assert not q.admit("b", Kind.TELEMETRY, 2000, 0.0).admitted
    # the refused message did not spend a telemetry token: 20 small ones still pass
    assert all(q.admit("b", Kind.TELEMETRY, 1, 0.0).admitted for _ in range(20))


def test_alert_once_per_interval_and_flooding_view() -> None:
    q = Quotas(policy())
    verdicts = [q.admit("b", Kind.TELEMETRY, 1, 0.0) for _ in range(30)]
    assert sum(v.alert for v in verdicts) == 1
    assert q.flooding(30.0) == ["b"]
    assert q.is_flooding("b", 30.0)
    assert not q.is_flooding("a", 30.0)
    assert q.flooding(61.0) == []
    for _ in range(30):
        v = q.admit("b", Kind.TELEMETRY, 1, 61.0)
        if v.alert:
            break
    else:
        raise AssertionError("no second alert after the interval")
    assert q.top_talkers(1)[0][0] == "b"


def test_unlimited_kind_and_override() -> None:
    q = Quotas(
        policy(overrides={"vip": QuotaPolicy({Kind.TELEMETRY: Rate(1000, 1000)}, Rate(1e9, 1e9))})
    )
    assert q.admit("x", Kind.ALERT, 1, 0.0).admitted  # no rate for alerts in this policy
    assert all(q.admit("vip", Kind.TELEMETRY, 1, 0.0).admitted for _ in range(500))


def test_state_stays_bounded_for_many_ids(monkeypatch) -> None:
    monkeypatch.setattr(quota, "MAX_BUCKETS", 100)
    q = Quotas(policy())
    for i in range(2_000):
        q.admit(f"d{i}", Kind.TELEMETRY, 1, float(i))  # each bucket is full again 2 s later
    assert len(q._messages) <= 101
    for i in range(1_000):
        for _ in range(25):
            q.admit(f"f{i}", Kind.TELEMETRY, 1, 0.0)
    assert len(q.talkers) <= quota.MAX_TALKERS + 1


def test_parse_override_keeps_only_known_positive_finite_rates() -> None:
    from dgdm.sync.coordinator.quota import parse_override

    assert parse_override(None) == {}
    assert parse_override("not json") == {}
    assert parse_override("[1]") == {}
    assert parse_override(
        '{"telemetry_per_s": 5, "result_per_s": -1, "alert_per_s": true,'
        ' "reply_per_s": "9", "bytes_per_s": 1e400, "other": 3}'
    ) == {"telemetry_per_s": 5.0}
