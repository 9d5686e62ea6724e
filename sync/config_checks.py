"""Checks at load time for the config values that are parsed only later (SPEC §7).

The settings loader checks types and ranges; these check what a value means: a public key
decodes, a private key file is a private X25519 key, TLS files parse, a URL has a host and
a port, a directory can be written. Each raises `ConfigError` naming the key, so a bad
config stops start-up (exit 2, one line) instead of failing once the service runs.
Messages name files and keys, never a secret's value. They only read the filesystem.
"""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dgdm.sync.errors import ConfigError, KeyFileError


def check_public_key(key: str, value: str) -> None:
    """`value` as the uplink reads it: base64 of 32 raw bytes, PEM text or a PEM file."""
    from dgdm.sync.crypto import load_public_key

    try:
        load_public_key(value)
    except KeyFileError as exc:
        hint = "base64 of its 32 raw bytes, PEM text or a PEM file"
        raise ConfigError(key, f"is not an X25519 public key ({hint}): {exc}") from None


def check_private_key(key: str, path: Path) -> None:
    """An unencrypted PKCS#8 X25519 key that only its owner can read."""
    from dgdm.sync.crypto import load_private_key

    try:
        load_private_key(path)
    except KeyFileError as exc:
        raise ConfigError(key, str(exc)) from None


def check_broker_url(key: str, url: str) -> None:
    """mqtt[s]://host[:port] with a host and a port in 1..65535 (the loader checked the form)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(key, "has an invalid host or port") from None
    if not parts.hostname:
        raise ConfigError(key, "names no host")
    if port == 0:
        raise ConfigError(key, "port must be 1..65535")


def check_tls_files(section: str, values: Any) -> None:
    """`ca_file`, `cert_file` and `key_file` of a section, as the MQTT client loads them: the
    key is `key_file`, or inside `cert_file` when only that is given."""
    if values.ca_file is not None:
        name = f"{section}.ca_file"
        _read(name, values.ca_file)
        try:
            ssl.create_default_context(cafile=str(values.ca_file))
        except (OSError, ssl.SSLError):
            raise ConfigError(name, f"{values.ca_file} holds no PEM CA certificate") from None
    if values.cert_file is None:
        if values.key_file is not None:
            raise ConfigError(f"{section}.key_file", f"is only used with {section}.cert_file")
        return
    cert_name = f"{section}.cert_file"
    _check_certificate(cert_name, values.cert_file)
    key_name = f"{section}.key_file" if values.key_file is not None else cert_name
    key_path = values.key_file if values.key_file is not None else values.cert_file
    _check_tls_key(key_name, key_path)
    try:
        ssl.create_default_context().load_cert_chain(str(values.cert_file), str(key_path))
    except (OSError, ssl.SSLError):
        raise ConfigError(key_name, f"does not match the certificate of {cert_name}") from None


def check_writable_dir(key: str, path: Path) -> None:
    """`path` is a directory this process can write, or one it can create."""
    probe = path
    try:
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        is_dir = probe.is_dir()
    except (OSError, ValueError):
        raise ConfigError(key, f"{path} is not a usable path") from None
    if not is_dir:
        raise ConfigError(key, f"{path} cannot be a directory: {probe} is not one")
    if not os.access(probe, os.W_OK | os.X_OK):
        verb = "is not writable" if probe == path else f"cannot be created in {probe}"
        raise ConfigError(key, f"{path} {verb} by this user")


def _read(key: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None


def _check_certificate(key: str, path: Path) -> None:
    from cryptography import x509

    try:
        x509.load_pem_x509_certificates(_read(key, path))
    except ValueError:
        raise ConfigError(key, f"{path} holds no PEM certificate") from None


def _check_tls_key(key: str, path: Path) -> None:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    data = _read(key, path)
    mode = path.stat().st_mode
    # Group read is allowed: the deployment gives the key to root and the service's group
    # (0640, ansible role dgdm_tls_client); any user of the box must not read it.
    if mode & stat.S_IRWXO:
        raise ConfigError(
            key,
            f"{path} is accessible by others (mode {stat.S_IMODE(mode):04o}); run chmod 640 {path}",
        )
    try:
        serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # An encrypted key would make OpenSSL prompt for its password on the terminal.
        raise ConfigError(key, f"{path} is an encrypted key; give it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(key, f"{path} holds no PEM private key") from None


def check_body_budget(key: str, budget: int, smallest: int = 64 * 1024) -> None:
    """An in-flight body budget is 0 (derived from memory) or holds at least an ordinary
    request body; below that nearly every request with a body would be refused (503)."""
    if 0 < budget < smallest:
        raise ConfigError(key, f"must be 0 (derived from memory) or at least {smallest} bytes")
