"""A hostile or buggy device against the coordinator's ingest: a poison message fails alone,
forged plaintext never erases real messages, bodies are bounded. Real SQLite files, the real
`store_envelopes` of ingest.py, real keys and sealed envelopes (issue 16 items 1, 2, 3)."""

from __future__ import annotations

import base64
import dataclasses
import os
import zlib
from pathlib import Path
from typing import Any

import pytest

from dgdm.sync.coordinator.config import CoordinatorConfig, CoordinatorSection
from dgdm.sync.coordinator.ingest import Opener, store_envelopes
from dgdm.sync.coordinator.registry import Registry
from dgdm.sync.coordinator.store import SqliteStore
from dgdm.sync.crypto import (
    LinkKeys,
    derive_link_keys,
    generate_keypair,
    load_private_key,
    load_public_key,
    raw_public,
)
from dgdm.sync.envelope import Kind, seal

INT63 = 2**63 - 1
TELEMETRY = {"samples": [{"ts_ms": 1, "cpu_percent": 3.5}]}


@dataclasses.dataclass
class Rig:
    opener: Opener
    store: SqliteStore
    keys: dict[str, LinkKeys]

    def sealed(self, device: str, kind: Kind, seq: int, body: Any, **kw: Any) -> bytes:
        k = self.keys[device]
        created = kw.pop("created_ms", 1_700_000_000_000)
        return seal(kind, seq, created, device, body, key=k.up, key_id=k.key_id, **kw)

    def ingest(self, raw: list[tuple[str, Kind, bytes]]) -> Any:
        return store_envelopes(raw, 1_700_000_000_500, self.opener, self.store)

    def stored(self, device: str, kind: Kind) -> list[int]:
        return [r["seq"] for r in self.store.latest(device, kind, 1000)]


def make_rig(tmp_path: Path, *, plaintext: tuple[str, ...] = (), **section: Any) -> Rig:
    coord_key, _, coord_pub = generate_keypair(tmp_path / "coord", name="coord")
    config = CoordinatorConfig(
        CoordinatorSection(data_dir=tmp_path / "data", private_key=coord_key, **section)
    )
    store = SqliteStore(tmp_path / "data" / "coordinator.db")
    private = load_private_key(coord_key)
    keys = {}
    for name in ("good", "bad"):
        key_path, _, pub = generate_keypair(tmp_path / name, name="device")
        own = load_private_key(key_path)
        peer = load_public_key(coord_pub)
        keys[name] = derive_link_keys(own, peer, name, raw_public(own), raw_public(peer))
        if name in plaintext:
            store.add_device(name, pub, plaintext_telemetry=True)
        else:
            store.add_device(name, pub)
    registry = Registry(private, store.public_keys)
    registry.reload()
    return Rig(Opener.for_config(config, registry, store), store, keys)


@pytest.fixture
def rig(tmp_path: Path) -> Any:
    made = make_rig(tmp_path)
    yield made
    made.store.close()


@pytest.mark.parametrize("field", ["seq", "created_ms"])
def test_a_uint64_above_int63_fails_alone_and_the_other_device_is_stored(rig, field) -> None:
    values = {"seq": 7, "created_ms": 1_700_000_000_000, field: 2**63}
    poison = rig.sealed(
        "bad", Kind.TELEMETRY, values["seq"], TELEMETRY, created_ms=values["created_ms"]
    )
    raw = [
        ("good", Kind.RESULT, rig.sealed("good", Kind.RESULT, 1, {"job_id": "a"})),
        ("bad", Kind.TELEMETRY, poison),
        ("bad", Kind.TELEMETRY, rig.sealed("bad", Kind.TELEMETRY, 8, TELEMETRY)),
        ("good", Kind.RESULT, rig.sealed("good", Kind.RESULT, 2, {"job_id": "b"})),
    ]
    batch, _ = rig.ingest(raw)
    assert sorted(rig.stored("good", Kind.RESULT)) == [1, 2]
    assert rig.stored("bad", Kind.TELEMETRY) == [8]
    assert sorted(batch.seqs["good"]) == [1, 2]
    # Authenticated, so receipted (in quarantine): the device stops resending it.
    assert sorted(batch.seqs["bad"]) == sorted({values["seq"], 8})
    quarantined = rig.store.quarantined("bad")
    assert [(q["kind"], q["reason"]) for q in quarantined] == [("telemetry", "malformed")]
    assert quarantined[0]["seq"] == str(values["seq"])


@pytest.mark.parametrize(
    "body",
    [
        {"cmd_seq": 2**64, "ok": True},  # a reply's command seq is bound as an SQL integer
        {"cmd_seq": 2**63, "ok": True},
        {"cmd_seq": -(2**63) - 1, "ok": True},
    ],
)
def test_an_integer_inside_a_reply_body_out_of_range_fails_alone(rig, body) -> None:
    raw = [
        ("bad", Kind.REPLY, rig.sealed("bad", Kind.REPLY, 3, body)),
        ("good", Kind.ALERT, rig.sealed("good", Kind.ALERT, 4, {"code": "x"})),
    ]
    batch, _ = rig.ingest(raw)
    assert rig.stored("good", Kind.ALERT) == [4]
    assert batch.seqs == {"bad": [3], "good": [4]}
    assert [q["reason"] for q in rig.store.quarantined("bad")] == ["malformed"]


def test_a_non_finite_number_in_a_body_fails_alone(rig) -> None:
    # 1e400 parses to inf; stored, the API would serve `Infinity`, which is not JSON.
    inf_body = b'{"samples":[{"ts_ms":1,"cpu_percent":1e400}]}'
    nan_body = b'{"samples":[{"ts_ms":1,"cpu_percent":NaN}]}'
    raw = [
        ("bad", Kind.TELEMETRY, rig.sealed("bad", Kind.TELEMETRY, 1, inf_body)),
        ("bad", Kind.TELEMETRY, rig.sealed("bad", Kind.TELEMETRY, 2, nan_body)),
        ("good", Kind.TELEMETRY, rig.sealed("good", Kind.TELEMETRY, 1, TELEMETRY)),
    ]
    batch, _ = rig.ingest(raw)
    assert rig.stored("good", Kind.TELEMETRY) == [1]
    assert rig.stored("bad", Kind.TELEMETRY) == []
    assert sorted(batch.seqs["bad"]) == [1, 2]
    assert sorted(q["reason"] for q in rig.store.quarantined("bad")) == ["bad_body", "bad_body"]


def test_the_quarantine_keeps_a_bounded_sample_and_a_bounded_count(rig) -> None:
    body = {"cmd_seq": 2**64, "pad": "x" * 100_000}
    rig.ingest([("bad", Kind.REPLY, rig.sealed("bad", Kind.REPLY, 1, body))])
    (row,) = rig.store.quarantined("bad")
    assert 0 < len(row["sample"]) <= 512


def _plain(device: str, seq: int, body: Any) -> bytes:
    return seal(Kind.TELEMETRY, seq, 1_700_000_000_000, device, body, key=None, key_id=bytes(4))


def test_forged_plaintext_telemetry_is_refused_for_a_sealed_device(rig) -> None:
    # The forger takes the seq of the device's real, not yet delivered, result.
    forged = _plain("good", 5, TELEMETRY)
    batch, _ = rig.ingest([("good", Kind.TELEMETRY, forged)])
    assert batch.seqs == {}
    assert batch.rejects == {"unencrypted": 1}
    assert rig.stored("good", Kind.TELEMETRY) == []


def test_plaintext_telemetry_of_a_plaintext_device_is_stored_but_never_receipted(
    tmp_path: Path,
) -> None:
    rig = make_rig(tmp_path, plaintext=("good",))
    try:
        forged = _plain("good", 5, TELEMETRY)
        real = rig.sealed("good", Kind.RESULT, 6, {"job_id": "r"})
        batch, _ = rig.ingest([("good", Kind.TELEMETRY, forged), ("good", Kind.RESULT, real)])
        assert rig.stored("good", Kind.TELEMETRY) == [5]
        # Only the sealed seq is receipted: a forged plaintext seq deletes nothing.
        assert batch.seqs == {"good": [6]}
    finally:
        rig.store.close()


def _bomb(rig: Rig, device: str, seq: int, inflated: bytes, kind: Kind = Kind.TELEMETRY) -> bytes:
    k = rig.keys[device]
    return seal(kind, seq, 1, device, inflated, key=k.up, key_id=k.key_id, compress=True)


@pytest.mark.parametrize(
    "inflated",
    [
        b'{"a":[' + b"[]," * 200_000 + b"[]]}",  # 600 KB of tiny lists: beyond telemetry's cap
        b'{"a":' + b"[" * 100 + b"]" * 100 + b"}",  # deeper than any SPEC body
        b'{"a":"' + b"0" * 200_000 + b'"}',  # inflation ratio far above real telemetry's
    ],
    ids=["many-containers", "deep", "ratio"],
)
def test_bodies_beyond_the_kinds_bounds_are_quarantined(rig, inflated) -> None:
    raw = [
        ("bad", Kind.TELEMETRY, _bomb(rig, "bad", 1, inflated)),
        ("good", Kind.TELEMETRY, rig.sealed("good", Kind.TELEMETRY, 1, TELEMETRY)),
    ]
    batch, _ = rig.ingest(raw)
    assert rig.stored("good", Kind.TELEMETRY) == [1]
    assert batch.seqs == {"bad": [1], "good": [1]}
    assert [q["reason"] for q in rig.store.quarantined("bad")] in (["too_large"], ["bad_body"])


def test_a_deep_body_inside_a_string_is_not_nesting(rig) -> None:
    body = {"samples": [], "note": "[" * 1000 + "{" * 1000 + '"\\"['}
    batch, _ = rig.ingest([("good", Kind.TELEMETRY, rig.sealed("good", Kind.TELEMETRY, 1, body))])
    assert rig.store.latest("good", Kind.TELEMETRY, 1)[0]["body"] == body
    assert batch.seqs == {"good": [1]}


def test_a_result_may_be_as_large_as_the_configured_result_cap(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, max_result_body_bytes=4 * 1024 * 1024)
    try:
        # Random floats in base64 barely deflate: only the size cap applies.
        embedding = base64.b64encode(os.urandom(3 * 1024 * 1024 * 3 // 4)).decode()
        ok = rig.sealed("good", Kind.RESULT, 1, {"embedding": {"b64": embedding}})
        big = rig.sealed("good", Kind.RESULT, 2, {"embedding": {"b64": embedding * 2}})
        rig.ingest([("good", Kind.RESULT, ok), ("good", Kind.RESULT, big)])
        assert rig.stored("good", Kind.RESULT) == [1]
        assert [q["reason"] for q in rig.store.quarantined("good")] == ["too_large"]
    finally:
        rig.store.close()


def test_quarantine_survives_in_the_file(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    rig.ingest([("bad", Kind.REPLY, rig.sealed("bad", Kind.REPLY, 9, {"cmd_seq": 2**64}))])
    rig.store.close()
    again = SqliteStore(tmp_path / "data" / "coordinator.db")
    try:
        assert [q["seq"] for q in again.quarantined("bad")] == ["9"]
    finally:
        again.close()


def test_zlib_garbage_from_an_unknown_device_is_a_plain_reject(rig) -> None:
    junk = zlib.compress(b"x")
    batch, _ = rig.ingest([("nobody", Kind.TELEMETRY, junk)])
    assert batch.seqs == {}
    assert rig.store.quarantined("nobody") == []


def test_a_status_time_beyond_64_bits_is_dropped_not_raised(rig) -> None:
    rig.store.set_status("good", {"state": "online", "ts_ms": 2**64}, 5)
    row = rig.store.device("good")
    assert (row["online"], row["status_ms"], row["last_seen_ms"]) == (1, None, 5)


def test_a_result_with_100k_node_ids_is_stored_but_a_million_floats_are_not(rig) -> None:
    node_ids = [f"n{i}" for i in range(100_000)]
    real = {"node_ids": node_ids, "embedding": {"shape": [100_000, 8], "b64": "AAAA"}}
    floats = b'{"x":[' + b"1.5," * 1_000_000 + b"1.5]}"  # 4 MB: ~32 MB of floats decoded
    batch, _ = rig.ingest(
        [
            ("good", Kind.RESULT, rig.sealed("good", Kind.RESULT, 1, real)),
            ("bad", Kind.RESULT, rig.sealed("bad", Kind.RESULT, 2, floats, compress=False)),
        ]
    )
    assert rig.stored("good", Kind.RESULT) == [1]
    assert batch.seqs == {"good": [1], "bad": [2]}
    (row,) = rig.store.quarantined("bad")
    assert row["reason"] == "bad_body"
    assert "values" in row["sample"]


def test_quarantine_log_lines_are_one_per_device_per_minute() -> None:
    from dgdm.sync.coordinator.lograte import LogRate

    rate = LogRate(60.0, max_keys=4)
    assert rate.allow("a", 0.0)
    assert not rate.allow("a", 59.9)
    assert rate.allow("b", 59.9)  # another device has its own minute
    assert not rate.allow("a", 30.0)
    assert rate.take_suppressed("a") == 2
    assert rate.allow("a", 60.0)
    for key in "cdefgh":  # many ids: memory stays bounded, the stalest are forgotten
        assert rate.allow(key, 61.0)
    assert len(rate._last) <= 4
