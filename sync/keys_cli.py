"""`dgdm keys generate`: make an X25519 key pair for a device or the coordinator."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = subparsers.add_parser("keys", help="manage X25519 key pairs")
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    generate = actions.add_parser(
        "generate",
        help="write NAME.key (PKCS#8 PEM, mode 0600) and NAME.pub; print the base64 public key",
    )
    generate.add_argument("--out", type=Path, required=True, help="directory for the key files")
    generate.add_argument("--name", default="device", help="file name stem (default: device)")
    generate.add_argument("--force", action="store_true", help="replace an existing key pair")
    generate.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from dgdm.sync.crypto import generate_keypair
    from dgdm.sync.envelope import DEVICE_ID_RE
    from dgdm.sync.errors import ConfigError

    # The name becomes a file name: keep it to the device id alphabet, no paths.
    if DEVICE_ID_RE.fullmatch(args.name) is None or args.name.startswith("."):
        raise ConfigError("--name", "must match [A-Za-z0-9._-]{1,64} and not start with '.'")
    private_path, public_path, public_b64 = generate_keypair(
        args.out, name=args.name, force=args.force
    )
    print(f"wrote {private_path} (mode 0600) and {public_path}", file=sys.stderr)
    print(public_b64)
    return 0
