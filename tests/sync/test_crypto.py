"""X25519 key files, key ids and the SPEC §6 HKDF link keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from dgdm.sync import crypto
from dgdm.sync.errors import KeyFileError

# RFC 7748 §6.1: Alice is the device, Bob the coordinator.
DEVICE_PRIVATE = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
COORD_PRIVATE = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"
DEVICE_PUBLIC = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
COORD_PUBLIC = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
SHARED = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
# HKDF-SHA256 (RFC 5869) by hand: PRK = HMAC(salt, shared); OKM = HMAC(PRK, info ‖ 0x01).
UP_KEY = "bf21a43e8c7377624215f3538ca7a509079f864afba7238d9ddba6d81d803a75"
DOWN_KEY = "8dcaf568e1c86037f430187383cd451167231c1b4c2455721f1696ff15068e6a"
KEY_ID = "99625b51"


def _private(hex_key: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes.fromhex(hex_key))


def _hand_hkdf(shared: bytes, info: bytes) -> bytes:
    prk = hmac.new(b"dgdm/v1", shared, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def test_link_keys_match_hand_computed_vector() -> None:
    device, coord = _private(DEVICE_PRIVATE), _private(COORD_PRIVATE)
    assert crypto.raw_public(device).hex() == DEVICE_PUBLIC
    assert crypto.raw_public(coord).hex() == COORD_PUBLIC
    shared = bytes.fromhex(SHARED)
    assert _hand_hkdf(shared, b"up:edge-0001").hex() == UP_KEY
    assert _hand_hkdf(shared, b"down:edge-0001").hex() == DOWN_KEY
    keys = crypto.derive_link_keys(
        device,
        coord.public_key(),
        "edge-0001",
        bytes.fromhex(DEVICE_PUBLIC),
        bytes.fromhex(COORD_PUBLIC),
    )
    assert keys.up.hex() == UP_KEY
    assert keys.down.hex() == DOWN_KEY
    assert keys.key_id.hex() == KEY_ID


def test_both_ends_derive_the_same_keys_and_device_ids_separate_them() -> None:
    device, coord = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    dev_raw, coord_raw = crypto.raw_public(device), crypto.raw_public(coord)
    mine = crypto.derive_link_keys(device, coord.public_key(), "a", dev_raw, coord_raw)
    theirs = crypto.derive_link_keys(coord, device.public_key(), "a", dev_raw, coord_raw)
    other = crypto.derive_link_keys(device, coord.public_key(), "b", dev_raw, coord_raw)
    assert mine == theirs
    assert mine.up != mine.down
    assert other.up != mine.up


def test_key_id_is_ordered_and_checks_lengths() -> None:
    a, b = bytes(range(32)), bytes(range(32, 64))
    assert crypto.key_id(a, b) == hashlib.sha256(a + b).digest()[:4]
    assert crypto.key_id(a, b) != crypto.key_id(b, a)
    with pytest.raises(KeyFileError):
        crypto.key_id(a[:31], b)


def test_generate_writes_0600_private_and_loadable_public(tmp_path) -> None:
    private_path, public_path, public_b64 = crypto.generate_keypair(tmp_path / "keys")
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    key = crypto.load_private_key(private_path)
    assert base64.b64decode(public_b64) == crypto.raw_public(key)
    assert crypto.raw_public(crypto.load_public_key(public_path)) == crypto.raw_public(key)
    assert crypto.raw_public(crypto.load_public_key(str(public_path))) == crypto.raw_public(key)
    assert crypto.raw_public(crypto.load_public_key(public_b64)) == crypto.raw_public(key)
    pem = public_path.read_text()
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    assert crypto.raw_public(crypto.load_public_key(pem)) == crypto.raw_public(key)


def test_generate_refuses_to_overwrite_unless_forced(tmp_path) -> None:
    private_path, _, first = crypto.generate_keypair(tmp_path)
    with pytest.raises(KeyFileError, match="already exists"):
        crypto.generate_keypair(tmp_path)
    assert base64.b64decode(first) == crypto.raw_public(crypto.load_private_key(private_path))
    _, _, second = crypto.generate_keypair(tmp_path, force=True)
    assert second != first
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600


def test_private_key_is_0600_even_under_a_permissive_umask(tmp_path) -> None:
    old = os.umask(0)
    try:
        private_path, _, _ = crypto.generate_keypair(tmp_path, name="coordinator")
    finally:
        os.umask(old)
    assert private_path.name == "coordinator.key"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_load_private_refuses_group_or_other_access(tmp_path, mode) -> None:
    private_path, _, _ = crypto.generate_keypair(tmp_path)
    private_path.chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        crypto.load_private_key(private_path)


def test_load_private_rejects_missing_garbage_and_wrong_type(tmp_path) -> None:
    with pytest.raises(KeyFileError, match="cannot read"):
        crypto.load_private_key(tmp_path / "missing.key")
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key")
    garbage.chmod(0o600)
    with pytest.raises(KeyFileError, match="PKCS#8"):
        crypto.load_private_key(garbage)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    ed = tmp_path / "ed.key"
    ed.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ed.chmod(0o600)
    with pytest.raises(KeyFileError, match="X25519"):
        crypto.load_private_key(ed)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not base64!",
        base64.b64encode(b"x" * 31).decode(),
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----",
        "x" * 5000,
    ],
)
def test_load_public_rejects_bad_input_with_key_file_error(text) -> None:
    with pytest.raises(KeyFileError):
        crypto.load_public_key(text)
