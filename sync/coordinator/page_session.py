"""The fleet page's session cookie: minted and checked with no I/O (time and bytes in).

A browser navigation cannot send the bearer header, so `POST /login` with the API token sets
a cookie `<expiry>.<mac>`, where mac = HMAC-SHA256(token, "dgdm-page|<expiry>"). Nothing is
stored: every replica that shares the token checks the cookie the same way, a changed token
ends every session, and the cookie is not the token (a stolen cookie is read access until
its expiry, never the token that sends commands).
"""

from __future__ import annotations

import hashlib
import hmac

COOKIE_NAME = "dgdm_page"
MAX_AGE_S = 12 * 3600
_CONTEXT = b"dgdm-page|"
_MAC_HEX = 64


def _mac(token: str, expiry_s: int) -> str:
    message = _CONTEXT + str(expiry_s).encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def mint(token: str, now_s: float) -> str:
    """A cookie value valid for MAX_AGE_S from now."""
    expiry = int(now_s) + MAX_AGE_S
    return f"{expiry}.{_mac(token, expiry)}"


def valid(cookie: str | None, token: str, now_s: float) -> bool:
    """True for a cookie this token minted that has not expired (nor claims an expiry
    further away than any mint gives)."""
    if not cookie or len(cookie) > 32 + _MAC_HEX:
        return False
    expiry_text, _, mac = cookie.partition(".")
    if (
        not (expiry_text.isascii() and expiry_text.isdigit())
        or len(expiry_text) > 12
        or len(mac) != _MAC_HEX
    ):
        return False
    expiry = int(expiry_text)
    if not now_s < expiry <= now_s + MAX_AGE_S + 1:
        return False
    return hmac.compare_digest(mac.encode(), _mac(token, expiry).encode())


def token_matches(given: str, token: str) -> bool:
    """The login form's token against the configured one, in constant time."""
    return hmac.compare_digest(given.encode(), token.encode())
