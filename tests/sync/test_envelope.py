"""Envelope v1 (SPEC §6): byte layout, round trips, and every way a receiver rejects one."""

from __future__ import annotations

import dataclasses
import itertools
import json
import struct
import zlib

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from dgdm.sync import envelope as env
from dgdm.sync.envelope import Kind
from dgdm.sync.errors import EnvelopeError
from dgdm.sync.link_state import ExecutedCommands

KEY = bytes(range(32))
KEY_ID = b"\x99\x62\x5b\x51"
NONCE = bytes(range(100, 112))

device_ids = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.text(max_size=40)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
bodies = st.dictionaries(st.text(max_size=12), json_values, max_size=8)
# What a receiver accepts: SPEC §6 is uint64 on the wire, but stores hold signed 64 bits.
int63 = st.integers(0, 2**63 - 1)


def _open(data: bytes, **kw) -> env.Envelope:
    kw.setdefault("key", KEY)
    kw.setdefault("key_id", KEY_ID)
    kw.setdefault("expected_device", "dev-1")
    return env.open_envelope(data, **kw)


def test_plaintext_header_layout_is_byte_exact() -> None:
    data = env.seal(
        Kind.TELEMETRY, 0x0102030405060708, 0x1122334455667788, "dev-1", {}, key=None, key_id=KEY_ID
    )
    expected = (
        b"DG"  # magic
        + b"\x01"  # version
        + b"\x00"  # flags: neither encrypted nor compressed
        + b"\x02"  # kind telemetry
        + b"\x03"  # priority of telemetry
        + b"\x00\x00\x00\x00"  # key id zero when not encrypted
        + bytes.fromhex("0102030405060708")
        + bytes.fromhex("1122334455667788")
        + bytes(12)  # nonce zero when not encrypted
        + b"\x05dev-1"
        + b"{}"
    )
    assert data == expected
    assert env.FIXED_HEADER_BYTES == 39


def test_encrypted_layout_uses_whole_header_as_aad() -> None:
    data = env.seal(
        Kind.RESULT,
        7,
        1_700_000_000_000,
        "dev-1",
        {"a": 1},
        key=KEY,
        key_id=KEY_ID,
        nonce=NONCE,
        compress=False,
    )
    header = (
        b"DG\x01\x01\x01\x02"
        + KEY_ID
        + struct.pack(">QQ", 7, 1_700_000_000_000)
        + NONCE
        + b"\x05dev-1"
    )
    assert data[: len(header)] == header
    plain = AESGCM(KEY).decrypt(NONCE, data[len(header) :], header)
    assert plain == b'{"a":1}'
    assert len(data) == len(header) + len(plain) + 16


def test_compression_flag_and_auto_choice() -> None:
    big = {"x": "a" * 1000}
    packed = env.seal(Kind.RESULT, 1, 1, "d", big, key=None, key_id=KEY_ID)
    assert packed[3] == env.FLAG_COMPRESSED
    assert zlib.decompress(packed[40:]) == json.dumps(big, separators=(",", ":")).encode()
    small = env.seal(Kind.RESULT, 1, 1, "d", {"x": "y" * 50}, key=None, key_id=KEY_ID)
    assert small[3] == 0  # below the size where zlib can win, it is not tried
    assert env.seal(Kind.RESULT, 1, 1, "d", big, key=None, key_id=KEY_ID, compress=False)[3] == 0
    assert env.seal(Kind.RESULT, 1, 1, "d", {}, key=None, key_id=KEY_ID, compress=True)[3] == 2


@settings(max_examples=80, deadline=None)
@given(
    kind=st.sampled_from(list(Kind)),
    seq=int63,
    created=int63,
    device=device_ids,
    body=bodies,
    encrypt=st.booleans(),
    compress=st.sampled_from([None, True, False]),
    priority=st.none() | st.integers(0, 255),
)
def test_round_trip_every_kind(
    kind, seq, created, device, body, encrypt, compress, priority
) -> None:
    key = KEY if encrypt else None
    data = env.seal(
        kind,
        seq,
        created,
        device,
        body,
        key=key,
        key_id=KEY_ID,
        priority=priority,
        compress=compress,
    )
    plaintext_ok = not encrypt and kind is Kind.TELEMETRY
    if not encrypt and not plaintext_ok:
        with pytest.raises(EnvelopeError) as err:
            env.open_envelope(data, key=KEY, key_id=KEY_ID, expected_device=device)
        assert err.value.reason == "unencrypted"
        return
    opened = env.open_envelope(
        data,
        key=key,
        key_id=KEY_ID if encrypt else None,
        expected_device=device,
        allow_plaintext_telemetry=True,
    )
    header = opened.header
    assert (header.kind, header.seq, header.created_ms, header.device_id) == (
        kind,
        seq,
        created,
        device,
    )
    assert header.priority == (env.PRIORITY[kind] if priority is None else priority)
    assert header.encrypted is encrypt
    assert opened.body == json.loads(json.dumps(body))


def test_bytes_body_is_sent_as_is() -> None:
    data = env.seal(Kind.ALERT, 3, 4, "dev-1", b'{"code":"x"}', key=KEY, key_id=KEY_ID)
    assert _open(data).body == {"code": "x"}


def test_nonces_are_random_per_message() -> None:
    a = env.seal(Kind.RESULT, 1, 1, "d", {}, key=KEY, key_id=KEY_ID)
    b = env.seal(Kind.RESULT, 1, 1, "d", {}, key=KEY, key_id=KEY_ID)
    assert a[26:38] != b[26:38]
    assert a != b


def test_every_single_bit_flip_is_rejected() -> None:
    data = env.seal(Kind.RESULT, 5, 6, "d", {"k": 1}, key=KEY, key_id=KEY_ID, nonce=NONCE)
    assert len(data) * 8 > 400
    reasons = set()
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(EnvelopeError) as err:
            env.open_envelope(bytes(flipped), key=KEY, key_id=KEY_ID, expected_device="d")
        reasons.add(err.value.reason)
    assert {"bad_magic", "bad_version", "bad_flags", "bad_kind", "bad_key_id", "bad_tag"} <= reasons


def test_every_bit_flip_of_encrypted_telemetry_is_rejected_even_allowing_plaintext() -> None:
    data = env.seal(Kind.TELEMETRY, 5, 6, "d", {"k": 1}, key=KEY, key_id=KEY_ID, nonce=NONCE)
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(EnvelopeError):
            env.open_envelope(
                bytes(flipped),
                key=KEY,
                key_id=KEY_ID,
                expected_device="d",
                allow_plaintext_telemetry=True,
            )


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_only_ever_raise_envelope_error(data) -> None:
    with pytest.raises(EnvelopeError):
        env.open_envelope(
            data, key=KEY, key_id=KEY_ID, expected_device=None, allow_plaintext_telemetry=True
        )


@settings(max_examples=300, deadline=None)
@given(tail=st.binary(max_size=80), flags=st.integers(0, 3), kind=st.sampled_from([2, 1, 16]))
def test_random_bodies_behind_a_valid_header_only_raise_envelope_error(tail, flags, kind) -> None:
    key_id = KEY_ID if flags & 1 else bytes(4)
    nonce = NONCE if flags & 1 else bytes(12)
    header = b"DG\x01" + bytes([flags, kind, 0]) + key_id + bytes(16) + nonce + b"\x01d"
    try:
        env.open_envelope(
            header + tail,
            key=KEY,
            key_id=KEY_ID,
            expected_device="d",
            allow_plaintext_telemetry=True,
        )
    except EnvelopeError:
        return
    # Only plaintext telemetry with a JSON object body opens.
    assert flags & 1 == 0
    assert kind == 2


def _reason(data: bytes, **kw) -> str:
    with pytest.raises(EnvelopeError) as err:
        _open(data, **kw)
    return err.value.reason


def test_rejection_reasons() -> None:
    good = env.seal(Kind.RESULT, 1, 2, "dev-1", {"a": 1}, key=KEY, key_id=KEY_ID)
    assert _open(good).body == {"a": 1}
    assert _reason(good[:20]) == "malformed"
    assert _reason(good[:41]) == "malformed"  # header complete, tag missing
    assert _reason(b"XG" + good[2:]) == "bad_magic"
    assert _reason(good[:2] + b"\x02" + good[3:]) == "bad_version"
    assert _reason(good[:3] + b"\x05" + good[4:]) == "bad_flags"
    assert _reason(good[:4] + b"\x07" + good[5:]) == "bad_kind"
    assert _reason(good, key_id=b"abcd") == "bad_key_id"
    assert _reason(good, key=None) == "bad_key_id"
    assert _reason(good, key=bytes(32)) == "bad_tag"
    assert _reason(good, expected_device="dev-2") == "device_mismatch"
    assert _reason(good, max_bytes=len(good) - 1) == "too_large"
    other_device = env.seal(Kind.RESULT, 1, 2, "dev-2", {}, key=KEY, key_id=KEY_ID)
    assert _reason(other_device) == "device_mismatch"


def test_plaintext_only_for_telemetry_when_allowed() -> None:
    telemetry = env.seal(Kind.TELEMETRY, 1, 2, "dev-1", {"samples": []}, key=None, key_id=KEY_ID)
    assert _reason(telemetry) == "unencrypted"
    assert _open(telemetry, allow_plaintext_telemetry=True).body == {"samples": []}
    result = env.seal(Kind.RESULT, 1, 2, "dev-1", {}, key=None, key_id=KEY_ID)
    assert _reason(result, allow_plaintext_telemetry=True) == "unencrypted"
    # A plaintext header must carry zero key id and nonce, so they cannot smuggle data.
    assert (
        _reason(telemetry[:6] + b"abcd" + telemetry[10:], allow_plaintext_telemetry=True)
        == "malformed"
    )


def _plain_telemetry(body_bytes: bytes, flags: int = 0) -> bytes:
    header = b"DG\x01" + bytes([flags, 2, 3]) + bytes(4) + bytes(16) + bytes(12) + b"\x05dev-1"
    return header + body_bytes


@pytest.mark.parametrize(
    ("body", "flags"),
    [
        (b"[1, 2]", 0),  # not an object
        (b"\xff\xfe", 0),  # not UTF-8
        (b'{"a": NaN', 0),  # not JSON
        (b"not zlib", 2),
        (zlib.compress(b'{"a": 1}')[:-3], 2),  # truncated stream
        (zlib.compress(b'{"a": 1}') + b"xx", 2),  # trailing garbage
    ],
)
def test_bad_bodies(body, flags) -> None:
    assert _reason(_plain_telemetry(body, flags), allow_plaintext_telemetry=True) == "bad_body"


def test_zlib_bomb_is_capped() -> None:
    bomb = zlib.compress(b'{"a":"' + b"a" * (8 * 1024 * 1024) + b'"}', 9)
    assert len(bomb) < 20_000
    data = _plain_telemetry(bomb, env.FLAG_COMPRESSED)
    assert _reason(data, allow_plaintext_telemetry=True, max_body_bytes=1024 * 1024) == "too_large"
    assert (
        _open(data, allow_plaintext_telemetry=True, max_body_bytes=16 * 1024 * 1024).body["a"][:3]
        == "aaa"
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"device_id": "bad/id"},
        {"device_id": ""},
        {"device_id": "x" * 65},
        {"device_id": "dév"},
        {"seq": -1},
        {"seq": 2**64},
        {"created_ms": -5},
        {"priority": 256},
        {"kind": 4},
        {"body": [1, 2]},
        {"body": {"x": float("nan")}},
        {"body": {"x": object()}},
        {"key": b"short"},
        {"nonce": b"short"},
    ],
)
def test_seal_rejects_bad_fields(kwargs) -> None:
    args = {"kind": Kind.RESULT, "seq": 1, "created_ms": 1, "device_id": "d", "body": {}}
    args.update(kwargs)
    key = args.pop("key", KEY)
    nonce = args.pop("nonce", None)
    priority = args.pop("priority", None)
    with pytest.raises(EnvelopeError):
        env.seal(**args, key=key, key_id=KEY_ID, nonce=nonce, priority=priority)


def _command(seq: int, created_ms: int, body: dict) -> env.Envelope:
    data = env.seal(Kind.COMMAND, seq, created_ms, "dev-1", body, key=KEY, key_id=KEY_ID)
    return _open(data)


def test_command_ttl_and_replay() -> None:
    cmd = _command(10, 1_000, {"cmd": "ping", "args": {}, "ttl_ms": 500})
    env.check_command(cmd, now_ms=1_500, executed=ExecutedCommands(9).seen)
    env.check_command(
        cmd, now_ms=900, executed=ExecutedCommands().seen
    )  # sender clock ahead is fine
    with pytest.raises(EnvelopeError) as err:
        env.check_command(cmd, now_ms=1_501, executed=ExecutedCommands(9).seen)
    assert err.value.reason == "expired"
    for last in (10, 11):
        with pytest.raises(EnvelopeError) as err:
            env.check_command(cmd, now_ms=1_000, executed=ExecutedCommands(last).seen)
        assert err.value.reason == "replay"


@pytest.mark.parametrize(
    "body",
    [
        {"args": {}, "ttl_ms": 5},
        {"cmd": 1, "ttl_ms": 5},
        {"cmd": "ping"},
        {"cmd": "ping", "ttl_ms": -1},
        {"cmd": "ping", "ttl_ms": True},
        {"cmd": "ping", "ttl_ms": 1.5},
    ],
)
def test_command_body_must_name_cmd_and_ttl(body) -> None:
    with pytest.raises(EnvelopeError) as err:
        env.check_command(_command(1, 0, body), now_ms=0, executed=ExecutedCommands().seen)
    assert err.value.reason == "bad_body"


def test_check_command_refuses_other_kinds() -> None:
    reply = _open(
        env.seal(Kind.REPLY, 1, 1, "dev-1", {"cmd": "x", "ttl_ms": 1}, key=KEY, key_id=KEY_ID)
    )
    with pytest.raises(EnvelopeError) as err:
        env.check_command(reply, now_ms=1, executed=ExecutedCommands().seen)
    assert err.value.reason == "bad_kind"


@given(seqs=st.sets(st.integers(0, 200), max_size=60))
def test_receipt_ranges_round_trip(seqs) -> None:
    ranges = env.ranges_from_seqs(seqs)
    parsed = env.receipt_ranges({"ranges": ranges})
    covered = {s for first, last in parsed for s in range(first, last + 1)}
    assert covered == seqs
    assert all(b[0] > a[1] + 1 for a, b in itertools.pairwise(parsed))


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"ranges": 3},
        {"ranges": [[1]]},
        {"ranges": [[2, 1]]},
        {"ranges": [[1, "2"]]},
        {"ranges": [[-1, 2]]},
        {"ranges": [[True, 2]]},
        {"ranges": [[0, 2**64]]},
    ],
)
def test_receipt_ranges_reject_bad_bodies(body) -> None:
    with pytest.raises(EnvelopeError) as err:
        env.receipt_ranges(body)
    assert err.value.reason == "bad_body"


def test_topic_suffix_and_priority_cover_every_kind() -> None:
    assert set(env.TOPIC_SUFFIX) == set(Kind) == set(env.PRIORITY)
    assert env.TOPIC_SUFFIX[Kind.COMMAND] == "cmd"
    assert [env.PRIORITY[k] for k in (Kind.ALERT, Kind.REPLY, Kind.RESULT, Kind.TELEMETRY)] == [
        0,
        1,
        2,
        3,
    ]


@settings(max_examples=50, deadline=None)
@given(body=bodies)
def test_auto_compression_only_when_it_shrinks_the_body(body) -> None:
    plain = env.encode_body(body)
    data = env.seal(Kind.RESULT, 1, 1, "d", body, key=None, key_id=KEY_ID)
    if data[3] & env.FLAG_COMPRESSED:
        assert len(data) - 40 < len(plain)
    else:
        assert data[40:] == plain


@pytest.mark.parametrize("field", ["seq", "created_ms"])
@pytest.mark.parametrize("value", [2**63, 2**64 - 1])
def test_a_uint64_above_int63_is_malformed_and_said_to_be_sealed(field, value) -> None:
    fields = {"seq": 1, "created_ms": 1, field: value}
    data = env.seal(
        Kind.RESULT, fields["seq"], fields["created_ms"], "dev-1", {}, key=KEY, key_id=KEY_ID
    )
    with pytest.raises(env.SealedEnvelopeError) as err:
        _open(data)
    assert err.value.reason == "malformed"
    assert getattr(err.value.header, field) == value
    assert (
        env.open_envelope(
            env.seal(Kind.RESULT, 2**63 - 1, 2**63 - 1, "d", {}, key=KEY, key_id=KEY_ID),
            key=KEY,
            key_id=KEY_ID,
            expected_device="d",
        ).header.seq
        == 2**63 - 1
    )


def test_a_forged_tag_is_never_said_to_be_sealed() -> None:
    data = bytearray(env.seal(Kind.RESULT, 2**63, 1, "dev-1", {}, key=KEY, key_id=KEY_ID))
    data[-1] ^= 1
    with pytest.raises(EnvelopeError) as err:
        _open(bytes(data))
    assert not isinstance(err.value, env.SealedEnvelopeError)
    assert err.value.reason == "bad_tag"


@pytest.mark.parametrize("text", [b'{"a":NaN}', b'{"a":[Infinity]}', b'{"a":-Infinity}'])
def test_nan_and_infinity_are_not_json(text) -> None:
    with pytest.raises(EnvelopeError) as err:
        env.decode_body(text)
    assert err.value.reason == "bad_body"
    assert "not JSON" in str(err.value)


LIMITS = env.BodyLimits(
    max_bytes=1 << 20,
    max_ratio=100,
    ratio_floor=1024,
    max_depth=8,
    max_containers=100,
    max_values=200,
)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        (b'{"a":' + b"[" * 7 + b"]" * 7 + b"}", True),  # depth 8 with the outer object
        (b'{"a":' + b"[" * 8 + b"]" * 8 + b"}", False),
        (b'{"a":"' + b"[" * 50 + b'"}', True),  # brackets inside a string are text
        (b'{"a":"\\"[[[[[[[[[[[[","b":1}', True),  # escaped quotes do not end strings
        (b'{"a":"\\\\","b":' + b"[" * 9 + b"]" * 9 + b"}", False),  # an escaped backslash does
        (b'{"a":[' + b"[]," * 99 + b"[]]}", False),  # 101 containers
        (b'{"a":[' + b"[]," * 97 + b"[]]}", True),  # 100
        (b'{"a":1.5e3,"b":"x"}', True),
        (b'{"a":[' + b"1," * 200 + b"1]}", False),  # 201 values
        (b'{"a":[' + b"1," * 199 + b"1]}", True),
        (b'{"a":"' + b"1," * 500 + b'"}', True),  # commas inside a string are text
    ],
)
def test_structure_scan_counts_only_real_brackets(text, ok) -> None:
    json.loads(text)  # each case is valid JSON
    if ok:
        env.check_structure(text, LIMITS)
    else:
        with pytest.raises(EnvelopeError) as err:
            env.check_structure(text, LIMITS)
        assert err.value.reason == "bad_body"


def test_inflation_ratio_is_capped_beyond_the_floor() -> None:
    small = zlib.compress(b'{"a":"' + b"0" * 1000 + b'"}')
    big = zlib.compress(b'{"a":"' + b"0" * 200_000 + b'"}')
    assert env._inflate(small, LIMITS)
    with pytest.raises(EnvelopeError) as err:
        env._inflate(big, LIMITS)
    assert err.value.reason == "bad_body"
    assert "100:1" in str(err.value)


def test_receipts_never_carry_a_seq_no_outbox_can_hold() -> None:
    assert env.ranges_from_seqs([3, 2**63, 2**64 - 1, 4]) == [[3, 4]]
    body = {"ranges": [[1, 2], [5, 2**64 - 1], [2**63, 2**64 - 1]]}
    assert env.receipt_ranges(body) == [(1, 2), (5, 2**63 - 1)]


def _stats(value: object) -> tuple[int, int, int]:
    """(depth, containers, commas) of a JSON value, the reference for the byte scan."""
    if isinstance(value, dict | list):
        children = list(value.values()) if isinstance(value, dict) else value
        inner = [_stats(c) for c in children]
        depth = 1 + max((s[0] for s in inner), default=0)
        return (
            depth,
            1 + sum(s[1] for s in inner),
            max(len(children) - 1, 0) + sum(s[2] for s in inner),
        )
    return 0, 0, 0


tricky_text = st.text(alphabet='[]{},"\\:ab\u00e9 ', max_size=8)
tricky_json = st.recursive(
    st.none() | st.booleans() | st.integers() | tricky_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(tricky_text, inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(value=st.dictionaries(tricky_text, tricky_json, max_size=4), pad=st.integers(0, 70_000))
def test_structure_scan_agrees_with_the_parsed_value(value, pad) -> None:
    # `pad` pushes the structure across the scan's 64 KiB chunks inside a long string.
    body = {"pad": "[" * pad, **value} if pad else value
    text = json.dumps(body, ensure_ascii=False).encode()
    depth, containers, commas = _stats(body)
    exact = env.BodyLimits(max_depth=depth, max_containers=containers, max_values=commas + 1)
    env.check_structure(text, exact)
    for tighter in (
        dataclasses.replace(exact, max_depth=depth - 1),
        dataclasses.replace(exact, max_containers=containers - 1),
        dataclasses.replace(exact, max_values=commas),
    ):
        if tighter.max_depth >= 1:
            with pytest.raises(EnvelopeError):
                env.check_structure(text, tighter)
