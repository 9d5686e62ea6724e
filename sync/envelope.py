"""Envelope v1 (SPEC §6): the byte-exact wrapper around every device <-> coordinator payload.

Pure: bytes and time in, bytes and decisions out; no I/O, no clock. The whole header is the
AES-GCM associated data, so a flipped header bit fails the tag even where the field itself
still parses. Checks run cheapest first and each rejection carries a stable `reason` code
that receivers count.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dgdm.sync.errors import EnvelopeError

MAGIC = b"DG"
VERSION = 1
FLAG_ENCRYPTED = 0x01
FLAG_COMPRESSED = 0x02
KNOWN_FLAGS = FLAG_ENCRYPTED | FLAG_COMPRESSED
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_ID_BYTES = 4
MAX_DEVICE_ID_BYTES = 64
UINT64_MAX = 2**64 - 1

# magic, version, flags, kind, priority, key id, seq, created_ms, nonce, device id length
_FIXED = struct.Struct(">2sBBBB4sQQ12sB")
FIXED_HEADER_BYTES = _FIXED.size  # 39

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
# Below this a zlib stream rarely wins, so automatic compression does not try.
COMPRESS_MIN_BYTES = 128

DEVICE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ZERO_KEY_ID = bytes(KEY_ID_BYTES)
_ZERO_NONCE = bytes(NONCE_BYTES)
# One encoder reused: json.dumps with options builds a new encoder on every call.
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class Kind(IntEnum):
    RESULT = 1
    TELEMETRY = 2
    ALERT = 3
    COMMAND = 16
    REPLY = 17
    RECEIPT = 18


# Lower is more urgent (SPEC §5). Commands and receipts go cloud -> device and jump the queue.
PRIORITY: dict[Kind, int] = {
    Kind.ALERT: 0,
    Kind.REPLY: 1,
    Kind.RESULT: 2,
    Kind.TELEMETRY: 3,
    Kind.COMMAND: 0,
    Kind.RECEIPT: 0,
}

TOPIC_SUFFIX: dict[Kind, str] = {
    Kind.RESULT: "result",
    Kind.TELEMETRY: "telemetry",
    Kind.ALERT: "alert",
    Kind.COMMAND: "cmd",
    Kind.REPLY: "reply",
    Kind.RECEIPT: "receipt",
}

_KINDS = frozenset(int(kind) for kind in Kind)


@dataclass(frozen=True)
class Header:
    version: int
    flags: int
    kind: Kind
    priority: int
    key_id: bytes
    seq: int
    created_ms: int
    nonce: bytes
    device_id: str

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & FLAG_ENCRYPTED)

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_COMPRESSED)

    def pack(self) -> bytes:
        device = self.device_id.encode("utf-8")
        fixed = _FIXED.pack(
            MAGIC,
            self.version,
            self.flags,
            int(self.kind),
            self.priority,
            self.key_id,
            self.seq,
            self.created_ms,
            self.nonce,
            len(device),
        )
        return fixed + device


@dataclass(frozen=True)
class Envelope:
    header: Header
    body: dict[str, Any]


def valid_device_id(device_id: str) -> bool:
    return DEVICE_ID_RE.fullmatch(device_id) is not None


def encode_body(body: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON; NaN and non-JSON values are a bad body, not a crash later."""
    if not isinstance(body, Mapping):
        raise EnvelopeError("bad_body", f"body must be a JSON object, got {type(body).__name__}")
    try:
        text = _JSON.encode(body)
    except (TypeError, ValueError) as exc:
        raise EnvelopeError("bad_body", f"body is not JSON-serialisable: {exc}") from exc
    return text.encode("utf-8")


def seal(
    kind: Kind | int,
    seq: int,
    created_ms: int,
    device_id: str,
    body: Mapping[str, Any] | bytes,
    *,
    key: bytes | None,
    key_id: bytes,
    priority: int | None = None,
    nonce: bytes | None = None,
    compress: bool | None = None,
) -> bytes:
    """Build an envelope. `body` is a JSON object, or its UTF-8 JSON encoding as bytes.

    `key` None sends plaintext (key id and nonce zero). `compress` None compresses when that
    makes the body smaller, True always compresses, False never does.
    """
    kind = _checked_kind(kind)
    _check_seal_fields(
        seq=seq, created_ms=created_ms, device_id=device_id, key=key, key_id=key_id, nonce=nonce
    )
    plain = body if isinstance(body, bytes) else encode_body(body)
    payload, flags = _maybe_compress(plain, compress)
    if key is not None:
        flags |= FLAG_ENCRYPTED
        nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    else:
        key_id, nonce = _ZERO_KEY_ID, _ZERO_NONCE
    header = Header(
        version=VERSION,
        flags=flags,
        kind=kind,
        priority=PRIORITY[kind] if priority is None else priority,
        key_id=key_id,
        seq=seq,
        created_ms=created_ms,
        nonce=nonce,
        device_id=device_id,
    )
    if not 0 <= header.priority <= 255:
        raise EnvelopeError("malformed", f"priority {header.priority} is outside 0..255")
    aad = header.pack()
    if key is None:
        return aad + payload
    return aad + _aead(key).encrypt(nonce, payload, aad)


@functools.lru_cache(maxsize=256)
def _aead(key: bytes) -> AESGCM:
    """A device holds one or two link keys; the key schedule need not be redone per message."""
    return AESGCM(key)


def _checked_kind(kind: Kind | int) -> Kind:
    if int(kind) not in _KINDS:
        raise EnvelopeError("bad_kind", f"unknown kind {int(kind)}")
    return Kind(kind)


def _check_seal_fields(
    *,
    seq: int,
    created_ms: int,
    device_id: str,
    key: bytes | None,
    key_id: bytes,
    nonce: bytes | None,
) -> None:
    if not 0 <= seq <= UINT64_MAX:
        raise EnvelopeError("malformed", f"seq {seq} is not a uint64")
    if not 0 <= created_ms <= UINT64_MAX:
        raise EnvelopeError("malformed", f"created_ms {created_ms} is not a uint64")
    if not valid_device_id(device_id):
        raise EnvelopeError(
            "malformed", f"device_id {device_id!r} must match [A-Za-z0-9._-]{{1,64}}"
        )
    if key is not None and len(key) != 32:
        raise EnvelopeError("malformed", "key must be 32 bytes (AES-256)")
    if key is not None and len(key_id) != KEY_ID_BYTES:
        raise EnvelopeError("malformed", "key_id must be 4 bytes")
    if nonce is not None and len(nonce) != NONCE_BYTES:
        raise EnvelopeError("malformed", "nonce must be 12 bytes")


def _maybe_compress(plain: bytes, compress: bool | None) -> tuple[bytes, int]:
    if compress is False or (compress is None and len(plain) < COMPRESS_MIN_BYTES):
        return plain, 0
    packed = zlib.compress(plain, 6)
    if compress or len(packed) < len(plain):
        return packed, FLAG_COMPRESSED
    return plain, 0


def peek_header(data: bytes) -> Header:
    """Parse and validate the header only (no key needed): for routing and counting."""
    return _parse_header(data)[0]


def _parse_header(data: bytes) -> tuple[Header, int]:
    if len(data) < FIXED_HEADER_BYTES:
        raise EnvelopeError("malformed", f"envelope is {len(data)} bytes, shorter than a header")
    magic, version, flags, kind, priority, kid, seq, created, nonce, n = _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise EnvelopeError("bad_magic", f"magic is {magic!r}, expected b'DG'")
    if version != VERSION:
        raise EnvelopeError("bad_version", f"version {version} is not supported")
    if flags & ~KNOWN_FLAGS:
        raise EnvelopeError("bad_flags", f"unknown flag bits in 0x{flags:02x}")
    if kind not in _KINDS:
        raise EnvelopeError("bad_kind", f"unknown kind {kind}")
    end = FIXED_HEADER_BYTES + n
    if not 1 <= n <= MAX_DEVICE_ID_BYTES or len(data) < end:
        raise EnvelopeError("malformed", f"device_id length {n} is invalid or truncated")
    device_id = _parse_device_id(data[FIXED_HEADER_BYTES:end])
    if not flags & FLAG_ENCRYPTED and (kid != _ZERO_KEY_ID or nonce != _ZERO_NONCE):
        raise EnvelopeError("malformed", "plaintext envelope with a non-zero key id or nonce")
    header = Header(VERSION, flags, Kind(kind), priority, kid, seq, created, nonce, device_id)
    return header, end


def _parse_device_id(raw: bytes) -> str:
    try:
        device_id = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EnvelopeError("malformed", "device_id is not UTF-8") from exc
    if not valid_device_id(device_id):
        raise EnvelopeError("malformed", f"device_id {device_id!r} has invalid characters")
    return device_id


def open_envelope(
    data: bytes,
    *,
    key: bytes | None,
    key_id: bytes | None,
    expected_device: str | None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    allow_plaintext_telemetry: bool = False,
) -> Envelope:
    """Validate, decrypt and decode. Every failure is an EnvelopeError with a reason code.

    `expected_device` is the device id from the topic; `key_id` the one this receiver holds
    for that device (None skips the check). Plaintext is accepted only for telemetry and
    only when `allow_plaintext_telemetry`.
    """
    if len(data) > max_bytes:
        raise EnvelopeError("too_large", f"envelope is {len(data)} bytes, limit {max_bytes}")
    header, end = _parse_header(data)
    if expected_device is not None and header.device_id != expected_device:
        raise EnvelopeError(
            "device_mismatch", f"device_id {header.device_id!r} does not match {expected_device!r}"
        )
    payload = _decrypt(
        data, header, end, key=key, key_id=key_id, allow_plaintext=allow_plaintext_telemetry
    )
    if header.compressed:
        payload = _inflate(payload, max_body_bytes)
    return Envelope(header, decode_body(payload))


def _decrypt(
    data: bytes,
    header: Header,
    end: int,
    *,
    key: bytes | None,
    key_id: bytes | None,
    allow_plaintext: bool,
) -> bytes:
    if not header.encrypted:
        if header.kind is Kind.TELEMETRY and allow_plaintext:
            return data[end:]
        raise EnvelopeError("unencrypted", f"a plaintext {header.kind.name.lower()} is refused")
    if key is None:
        raise EnvelopeError("bad_key_id", "encrypted envelope but no key for this device")
    if key_id is not None and header.key_id != key_id:
        raise EnvelopeError(
            "bad_key_id", f"key id {header.key_id.hex()} does not match {key_id.hex()}"
        )
    if len(data) - end < TAG_BYTES:
        raise EnvelopeError("malformed", "encrypted body is shorter than its tag")
    try:
        return _aead(key).decrypt(header.nonce, data[end:], data[:end])
    except InvalidTag as exc:
        raise EnvelopeError("bad_tag", "authentication tag does not verify") from exc


def _inflate(payload: bytes, max_body_bytes: int) -> bytes:
    """Decompress with a hard cap, so a small zlib bomb cannot take the memory."""
    inflater = zlib.decompressobj()
    try:
        plain = inflater.decompress(payload, max_body_bytes + 1)
    except zlib.error as exc:
        raise EnvelopeError("bad_body", f"body is not valid zlib: {exc}") from exc
    if len(plain) > max_body_bytes:
        raise EnvelopeError("bad_body", f"decompressed body exceeds {max_body_bytes} bytes")
    if not inflater.eof or inflater.unused_data:
        raise EnvelopeError("bad_body", "zlib stream is truncated or has trailing bytes")
    return plain


def decode_body(payload: bytes) -> dict[str, Any]:
    try:
        body = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise EnvelopeError("bad_body", "body is not UTF-8") from exc
    except (ValueError, RecursionError) as exc:
        raise EnvelopeError("bad_body", "body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise EnvelopeError("bad_body", f"body must be a JSON object, got {type(body).__name__}")
    return body


# --- command acceptance: pure decisions on time and the last executed seq -----------------


def command_expired(created_ms: int, ttl_ms: int, now_ms: int) -> bool:
    """A command older than its ttl is dropped; a clock ahead of ours is not our problem."""
    return now_ms - created_ms > ttl_ms


def is_replay(seq: int, last_executed_seq: int | None) -> bool:
    """Command seqs only grow, so anything at or below the last executed one already ran."""
    return last_executed_seq is not None and seq <= last_executed_seq


def check_command(envelope: Envelope, now_ms: int, last_executed_seq: int | None) -> None:
    """Raise EnvelopeError (bad_kind, bad_body, replay, expired) unless it may execute now."""
    header, body = envelope.header, envelope.body
    if header.kind is not Kind.COMMAND:
        raise EnvelopeError("bad_kind", f"expected a command, got {header.kind.name.lower()}")
    if not isinstance(body.get("cmd"), str):
        raise EnvelopeError("bad_body", "command field 'cmd' must be a string")
    ttl_ms = body.get("ttl_ms")
    if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or ttl_ms < 0:
        raise EnvelopeError("bad_body", "command field 'ttl_ms' must be a non-negative integer")
    if is_replay(header.seq, last_executed_seq):
        raise EnvelopeError("replay", f"command seq {header.seq} was already executed")
    if command_expired(header.created_ms, ttl_ms, now_ms):
        raise EnvelopeError("expired", f"command seq {header.seq} is older than {ttl_ms} ms")


# --- receipts ---------------------------------------------------------------------------


def receipt_ranges(body: Mapping[str, Any]) -> list[tuple[int, int]]:
    """Validate a receipt body's inclusive ``ranges`` and return them as tuples."""
    ranges = body.get("ranges")
    if not isinstance(ranges, list):
        raise EnvelopeError("bad_body", "receipt field 'ranges' must be a list")
    out: list[tuple[int, int]] = []
    for item in ranges:
        if not (isinstance(item, list) and len(item) == 2 and all(_is_uint64(v) for v in item)):
            raise EnvelopeError("bad_body", "each receipt range must be [first_seq, last_seq]")
        if item[0] > item[1]:
            raise EnvelopeError("bad_body", f"receipt range {item} is reversed")
        out.append((item[0], item[1]))
    return out


def _is_uint64(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= UINT64_MAX


def ranges_from_seqs(seqs: Iterable[int]) -> list[list[int]]:
    """Collapse seqs into sorted inclusive [first, last] ranges for a receipt body."""
    out: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if out and seq == out[-1][1] + 1:
            out[-1][1] = seq
        else:
            out.append([seq, seq])
    return out
