"""SCRAM-SHA-256 verifiers (RFC 7677, as PostgreSQL stores them in pg_authid.rolpassword).

`scram.py make`: the password on stdin to a new verifier on stdout, so that the server (and
its log, and pg_stat_statements) only ever sees the verifier, never the password.
`scram.py check`: stdin's first line the password, its second a verifier: exit 0 when they
match, else 1, so the role sets the password only when it differs (a second run changes
nothing).
"""

import hashlib
import hmac
import os
import sys
from base64 import b64decode, b64encode

ITERATIONS = 4096  # PostgreSQL's scram_iterations default


def keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return hashlib.sha256(client_key).digest(), server_key


def make(password: str) -> str:
    salt = os.urandom(16)
    stored, server = keys(password, salt, ITERATIONS)
    return "SCRAM-SHA-256${}:{}${}:{}".format(
        ITERATIONS, *(b64encode(part).decode() for part in (salt, stored, server))
    )


def matches(password: str, verifier: str) -> bool:
    try:
        method, iter_salt, both = verifier.split("$")
        iterations, salt = iter_salt.split(":")
        stored, server = both.split(":")
        want = keys(password, b64decode(salt), int(iterations))
    except ValueError:  # no verifier yet, or another method (md5)
        return False
    return method == "SCRAM-SHA-256" and all(
        hmac.compare_digest(a, b)
        for a, b in zip(want, (b64decode(stored), b64decode(server)), strict=True)
    )


lines = sys.stdin.read().split("\n")
if sys.argv[1] == "make":
    print(make(lines[0]))
else:
    sys.exit(0 if len(lines) > 1 and matches(lines[0], lines[1]) else 1)
