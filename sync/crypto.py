"""X25519 key files and the per-link AES keys of SPEC §6.

Each device and the coordinator hold an X25519 pair. Both ends derive the same two 32-byte
keys from the shared secret with HKDF-SHA256: ``up`` (device -> cloud) and ``down``
(cloud -> device), bound to the device id so that one device's keys never open another's
traffic. The key id names the pair of public keys, so that a receiver can tell "wrong key"
apart from "tampered" before it tries to decrypt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dgdm.sync.errors import KeyFileError

HKDF_SALT = b"dgdm/v1"
KEY_BYTES = 32
KEY_ID_BYTES = 4
PRIVATE_FILE_MODE = 0o600


@dataclass(frozen=True)
class LinkKeys:
    """The AES-256-GCM keys of one device <-> coordinator link and the key id they go with."""

    up: bytes
    down: bytes
    key_id: bytes


def generate_keypair(
    out_dir: str | os.PathLike[str], *, name: str = "device", force: bool = False
) -> tuple[Path, Path, str]:
    """Write ``name.key`` (PKCS#8 PEM, 0600) and ``name.pub`` (SPKI PEM) into `out_dir`.

    Returns (private_path, public_path, base64 of the raw public key). Refuses to replace an
    existing key unless `force`: losing a device key orphans everything queued for it.
    """
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    private_path = directory / f"{name}.key"
    public_path = directory / f"{name}.pub"
    if not force:
        for path in (private_path, public_path):
            if path.exists():
                raise KeyFileError(f"{path} already exists; pass --force to replace it")
    key = X25519PrivateKey.generate()
    _write_private(private_path, key, force=force)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public_path.write_bytes(public_pem)
    return private_path, public_path, base64.b64encode(raw_public(key)).decode("ascii")


def _write_private(path: Path, key: X25519PrivateKey, *, force: bool) -> None:
    """Create the file with mode 0600 from the start, so it is never readable by others."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    if force:
        path.unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError as exc:
        raise KeyFileError(f"{path} already exists; pass --force to replace it") from exc
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), PRIVATE_FILE_MODE)  # the umask may have removed bits only
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())


def load_private_key(path: str | os.PathLike[str]) -> X25519PrivateKey:
    """Load a PKCS#8 PEM X25519 private key, refusing files that group or others can read."""
    key_path = Path(path)
    try:
        mode = key_path.stat().st_mode
        data = key_path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read private key {key_path}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"private key {key_path} is accessible by group or others "
            f"(mode {stat.S_IMODE(mode):04o}); run chmod 600 {key_path}"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"private key {key_path} is not an unencrypted PKCS#8 PEM") from exc
    if not isinstance(key, X25519PrivateKey):
        raise KeyFileError(f"private key {key_path} is not an X25519 key")
    return key


def load_public_key(source: str | bytes | os.PathLike[str]) -> X25519PublicKey:
    """Load a public key from a PEM file path, PEM text, or base64 of the 32 raw bytes."""
    if isinstance(source, os.PathLike):
        return _public_from_text(_read_public_file(Path(source)), where=str(source))
    text = source.decode("ascii", "replace") if isinstance(source, bytes) else source
    stripped = text.strip()
    if "-----BEGIN" in stripped:
        return _public_from_text(stripped, where="PEM text")
    if stripped and _is_file(stripped):
        return _public_from_text(_read_public_file(Path(stripped)), where=stripped)
    return _public_from_text(stripped, where="base64 public key")


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # names too long or with NUL bytes are not files
        return False


def _read_public_file(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read public key {path}") from exc


def _public_from_text(text: str, *, where: str) -> X25519PublicKey:
    if "-----BEGIN" in text:
        try:
            key = serialization.load_pem_public_key(text.encode("ascii"))
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise KeyFileError(f"{where} is not a PEM public key") from exc
        if not isinstance(key, X25519PublicKey):
            raise KeyFileError(f"{where} is not an X25519 public key")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFileError(f"{where} is neither PEM nor base64") from exc
    if len(raw) != KEY_BYTES:
        raise KeyFileError(f"{where} decodes to {len(raw)} bytes, expected {KEY_BYTES}")
    return X25519PublicKey.from_public_bytes(raw)


def raw_public(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key (or of a private key's public half)."""
    public = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(device_pub_raw: bytes, coord_pub_raw: bytes) -> bytes:
    """First 4 bytes of SHA-256(device public raw ‖ coordinator public raw)."""
    if len(device_pub_raw) != KEY_BYTES or len(coord_pub_raw) != KEY_BYTES:
        raise KeyFileError("public keys must be 32 raw bytes each")
    return hashlib.sha256(device_pub_raw + coord_pub_raw).digest()[:KEY_ID_BYTES]


def hkdf_link_key(shared: bytes, direction: str, device_id: str) -> bytes:
    """HKDF-SHA256(shared, salt=b"dgdm/v1", info=direction + ":" + device_id, 32 bytes)."""
    info = direction.encode("ascii") + b":" + device_id.encode("utf-8")
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=HKDF_SALT, info=info).derive(
        shared
    )


def derive_link_keys(
    own_private: X25519PrivateKey,
    peer_public: X25519PublicKey,
    device_id: str,
    device_public_raw: bytes,
    coordinator_public_raw: bytes,
) -> LinkKeys:
    """Both ends call this with their own private key and the other's public key."""
    try:
        shared = own_private.exchange(peer_public)
    except ValueError as exc:  # an all-zero shared secret: a low-order peer key
        raise KeyFileError("peer public key is not usable for X25519") from exc
    return LinkKeys(
        up=hkdf_link_key(shared, "up", device_id),
        down=hkdf_link_key(shared, "down", device_id),
        key_id=key_id(device_public_raw, coordinator_public_raw),
    )
