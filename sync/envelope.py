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
from collections.abc import Callable, Iterable, Mapping
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
# SPEC §6 puts uint64 on the wire, but stores (SQLite INTEGER, PostgreSQL bigint) hold
# signed 64 bits: a receiver refuses larger seqs and times rather than fail at insert.
INT63_MAX = 2**63 - 1

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
    body_bytes: int = 0  # the JSON text's size (after inflation): what decoding it cost


@dataclass(frozen=True)
class BodyLimits:
    """What a receiver lets one body cost before `json.loads` builds it.

    `max_ratio` (inflated / compressed) applies only above `ratio_floor` bytes, where a
    zlib bomb starts to matter; `max_depth`, `max_containers` and `max_values` (array
    elements and object members, counted by their commas) bound the objects the parser
    would create (a few KiB of `[],` would otherwise become a million lists, 32 MiB of
    `1.5,` 8 million floats).
    """

    max_bytes: int = 64 * 1024 * 1024
    max_ratio: int | None = None
    ratio_floor: int = 64 * 1024
    max_depth: int = 512
    max_containers: int | None = None
    max_values: int | None = None


class SealedEnvelopeError(EnvelopeError):
    """Refused after the tag verified: the device's own key sealed it, so its header can be
    trusted (a receiver may record and receipt it rather than have it resent forever).
    `sample` is the start of the decrypted body, for the record."""

    def __init__(self, reason: str, message: str, header: Header, sample: bytes) -> None:
        super().__init__(reason, message)
        self.header = header
        self.sample = sample


SAMPLE_BYTES = 512


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
    limits: BodyLimits | None = None,
) -> Envelope:
    """Validate, decrypt and decode. Every failure is an EnvelopeError with a reason code;
    a failure after the tag verified is a `SealedEnvelopeError`.

    `expected_device` is the device id from the topic; `key_id` the one this receiver holds
    for that device (None skips the check). Plaintext is accepted only for telemetry and
    only when `allow_plaintext_telemetry`. `limits` (default: `max_body_bytes` only) bounds
    what decoding the body may cost. A seq or created_ms above INT63_MAX is malformed.
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
    bounds = limits or BodyLimits(max_bytes=max_body_bytes)
    try:
        _check_header_ints(header)
        plain = _inflate(payload, bounds) if header.compressed else payload
        _check_body_size(plain, bounds)
        if limits is not None:  # a scan only where the receiver asked for one
            check_structure(plain, limits)
        return Envelope(header, decode_body(plain), len(plain))
    except EnvelopeError as exc:
        if not header.encrypted:
            raise
        raise SealedEnvelopeError(exc.reason, str(exc), header, payload[:SAMPLE_BYTES]) from exc


def _check_header_ints(header: Header) -> None:
    if header.seq > INT63_MAX:
        raise EnvelopeError("malformed", f"seq {header.seq} is above 2^63-1")
    if header.created_ms > INT63_MAX:
        raise EnvelopeError("malformed", f"created_ms {header.created_ms} is above 2^63-1")


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


def _inflate(payload: bytes, limits: BodyLimits) -> bytes:
    """Decompress with a hard cap, so a small zlib bomb cannot take the memory."""
    cap = limits.max_bytes
    if limits.max_ratio is not None:
        cap = min(cap, max(limits.ratio_floor, len(payload) * limits.max_ratio))
    inflater = zlib.decompressobj()
    try:
        plain = inflater.decompress(payload, cap + 1)
    except zlib.error as exc:
        raise EnvelopeError("bad_body", f"body is not valid zlib: {exc}") from exc
    if len(plain) > limits.max_bytes:
        raise EnvelopeError("too_large", f"decompressed body exceeds {limits.max_bytes} bytes")
    if len(plain) > cap:
        raise EnvelopeError(
            "bad_body", f"body inflates more than {limits.max_ratio}:1 beyond {cap} bytes"
        )
    if not inflater.eof or inflater.unused_data:
        raise EnvelopeError("bad_body", "zlib stream is truncated or has trailing bytes")
    return plain


def _check_body_size(plain: bytes, limits: BodyLimits) -> None:
    if len(plain) > limits.max_bytes:
        raise EnvelopeError("too_large", f"body is {len(plain)} bytes, limit {limits.max_bytes}")


# Escapes first (so that `\\"` cannot end a string early): then, in valid JSON, the pieces
# between quotes alternate structure and string, and the structure's brackets are real.
_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_NOT_MARKS = bytes(b for b in range(256) if b not in b'[]{},"')
_ONE_BRACKET = bytes.maketrans(b"{}", b"[]")


def check_structure(plain: bytes, limits: BodyLimits) -> None:
    """Refuse a body whose nesting or number of arrays and objects is beyond `limits`,
    by a byte scan (C-speed bytes methods only), before the parser allocates any of it."""
    if b"\\" in plain:
        plain = _ESCAPE.sub(b"", plain)
    # Only quotes and brackets matter, in order: a short string even for a large body.
    marks = plain.translate(None, _NOT_MARKS)
    if b'"' in marks:
        marks = _outside_strings(marks)
    if limits.max_values is not None and marks.count(b",") >= limits.max_values:
        raise EnvelopeError("bad_body", f"body has more than {limits.max_values} values")
    brackets = marks.translate(_ONE_BRACKET, b",")
    opened = brackets.count(b"[")
    if limits.max_containers is not None and opened > limits.max_containers:
        raise EnvelopeError(
            "bad_body", f"body has {opened} arrays and objects, limit {limits.max_containers}"
        )
    if opened <= limits.max_depth:
        return
    # Each pass removes exactly the innermost level (replace does not rescan its output).
    for _ in range(limits.max_depth):
        brackets = brackets.replace(b"[]", b"")
        if not brackets:
            return
    raise EnvelopeError("bad_body", f"body nests deeper than {limits.max_depth} (or is unbalanced)")


_SCAN_CHUNK = 64 * 1024


def _outside_strings(marks: bytes) -> bytes:
    """The bytes of `marks` outside JSON strings (escapes already gone, so every quote opens
    or closes one), a chunk at a time: a million strings never become a million pieces."""
    out = []
    inside = False
    for start in range(0, len(marks), _SCAN_CHUNK):
        pieces = marks[start : start + _SCAN_CHUNK].split(b'"')
        out.append(b"".join(pieces[1 if inside else 0 :: 2]))
        inside ^= len(pieces) % 2 == 0  # an odd number of quotes in this chunk
    return b"".join(out)


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NonFinite(name)


def decode_body(payload: bytes) -> dict[str, Any]:
    """The JSON object; NaN and Infinity are not JSON (RFC 8259) and are refused here, so
    nothing downstream ever has to serialise them."""
    try:
        body = json.loads(payload.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as exc:
        raise EnvelopeError("bad_body", "body is not UTF-8") from exc
    except _NonFinite as exc:
        raise EnvelopeError("bad_body", f"body holds {exc}, which is not JSON") from exc
    except (ValueError, RecursionError) as exc:
        raise EnvelopeError("bad_body", "body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise EnvelopeError("bad_body", f"body must be a JSON object, got {type(body).__name__}")
    return body


# --- command acceptance: pure decisions on time and the last executed seq -----------------


def command_expired(created_ms: int, ttl_ms: int, now_ms: int) -> bool:
    """A command older than its ttl is dropped; a clock ahead of ours is not our problem."""
    return now_ms - created_ms > ttl_ms


def check_command(envelope: Envelope, now_ms: int, executed: Callable[[int], bool]) -> None:
    """Raise EnvelopeError (bad_kind, bad_body, replay, expired) unless it may execute now;
    `executed(seq)` says whether that seq already ran (`link_state.ExecutedCommands.seen`)."""
    header, body = envelope.header, envelope.body
    if header.kind is not Kind.COMMAND:
        raise EnvelopeError("bad_kind", f"expected a command, got {header.kind.name.lower()}")
    if not isinstance(body.get("cmd"), str):
        raise EnvelopeError("bad_body", "command field 'cmd' must be a string")
    ttl_ms = body.get("ttl_ms")
    if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or ttl_ms < 0:
        raise EnvelopeError("bad_body", "command field 'ttl_ms' must be a non-negative integer")
    if executed(header.seq):
        raise EnvelopeError("replay", f"command seq {header.seq} was already executed")
    if command_expired(header.created_ms, ttl_ms, now_ms):
        raise EnvelopeError("expired", f"command seq {header.seq} is older than {ttl_ms} ms")


# --- receipts ---------------------------------------------------------------------------


def receipt_ranges(body: Mapping[str, Any]) -> list[tuple[int, int]]:
    """Validate a receipt body's inclusive ``ranges`` and return them as tuples, clipped to
    0..INT63_MAX: no outbox holds a larger seq, and SQLite cannot even compare with one."""
    ranges = body.get("ranges")
    if not isinstance(ranges, list):
        raise EnvelopeError("bad_body", "receipt field 'ranges' must be a list")
    out: list[tuple[int, int]] = []
    for item in ranges:
        if not (isinstance(item, list) and len(item) == 2 and all(_is_uint64(v) for v in item)):
            raise EnvelopeError("bad_body", "each receipt range must be [first_seq, last_seq]")
        if item[0] > item[1]:
            raise EnvelopeError("bad_body", f"receipt range {item} is reversed")
        if item[0] <= INT63_MAX:
            out.append((item[0], min(item[1], INT63_MAX)))
    return out


def _is_uint64(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= UINT64_MAX


def ranges_from_seqs(seqs: Iterable[int]) -> list[list[int]]:
    """Collapse seqs into sorted inclusive [first, last] ranges for a receipt body. A seq
    above INT63_MAX is left out: no outbox can hold one (a quarantined envelope may carry
    it), and a receiver's SQLite would fail on the whole receipt."""
    out: list[list[int]] = []
    for seq in sorted({s for s in seqs if s <= INT63_MAX}):
        if out and seq == out[-1][1] + 1:
            out[-1][1] = seq
        else:
            out.append([seq, seq])
    return out
